"""``edge-train``: train the client sub-model on this device against ``cloud-serve``."""

from __future__ import annotations

import json
import signal
import sys

import click

from ..errors import MAX_THREADS, Checked, FiniteFloat, UserError
from ..profiles.cli import ProfileParam
from ..wire.transport import endpoint_option
from .data import parse_scheme

# the protocol's integers are within +-(2**53 - 1), and a step id stays below that (splitedge.wire.protocol)
MAX_STEPS = 2**53 - 2
MAX_ID = 2**53 - 1


#: --partition, checked while the arguments are parsed
PARTITION = Checked(parse_scheme, "iid|dirichlet:ALPHA")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--artifacts", "-a", required=True, type=click.Path(file_okay=False),
              help="Artifact directory written by export-client (the edge reads client/ and manifest.json).")
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, callback=endpoint_option,
              help="cloud-serve's ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH).")
@click.option("--data", default="fashion-mnist", show_default=True,
              help="fashion-mnist | idx:DIR | cifar10:DIR | folder:DIR | synthetic[:...]. Read from disk, never "
                   "downloaded.")
@click.option("--client-id", type=click.IntRange(0, MAX_ID), default=0, show_default=True, help="This client's index.")
@click.option("--num-clients", type=click.IntRange(1, MAX_ID), default=1, show_default=True,
              help="Number of clients the training set is split between.")
@click.option("--partition", type=PARTITION, default="iid", show_default=True,
              help="How the training set is split: iid, or dirichlet:ALPHA (non-IID, seeded).")
@click.option("--epochs", type=click.IntRange(1, MAX_STEPS), default=None, help="Epochs over this client's shard [default: 1].")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None, help="Train steps instead of --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Training batch size (with --profile and no --batch-size: the profile's).")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate on the test split every N steps (0: only at the end).")
@click.option("--eval-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate on the first N test samples (0: all).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Evaluation batch size.")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON summary (accuracy, steps, samples, bytes sent/received, wall time, codec) here "
                   "(an earlier summary is replaced; any other existing file is refused).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Edge learning rate [default: the one in the manifest].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the partition and the batch order.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where to keep edge checkpoints (ORT checkpoint + position in the shard).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Checkpoint every N steps (and at the end).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True,
              help="Checkpoints kept in --checkpoint-dir (older ones of this run are deleted; never files or "
                   "checkpoints it did not write or resume from).")
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint LATEST names in --checkpoint-dir (which must exist; one without a "
                   "checkpoint yet starts from the initial weights, skipping the steps the cloud applied; one with "
                   "checkpoints but no readable LATEST is refused, with how to repair it).")
@click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: ORT's default; with --profile and no --threads: the profile's).")
@click.option("--backend", type=click.Choice(["ort-training", "portable"]), default=None,
              help="How the edge half trains. ort-training: onnxruntime-training 1.19.2's training API (x86_64, "
                   "Python <= 3.11, imports torch). portable: the plain ONNX graphs in client/portable/ on any "
                   "onnxruntime InferenceSession (plain onnxruntime >= 1.11, any Python >= 3.8), numpy optimizer, "
                   "BatchNorm and optimizers exactly as PyTorch. A checkpoint resumes only with the backend that "
                   "wrote it.  [default: with --profile, the profile's (portable for plain onnxruntime builds); "
                   "else ort-training]")
@click.option("--profile", type=ProfileParam(as_string=True), default=None,
              help="Device profile, a name from `splitedge profiles list` or a profile file: execution providers "
                   "for the forward-only graph and for training, threads, default batch size.")
@click.option("--timeout", "request_timeout", type=FiniteFloat(min=0.1), default=30.0, show_default=True,
              help="Seconds before a request is retried (with backoff, same request id).")
@click.option("--give-up", type=FiniteFloat(min=1), default=300.0, show_default=True,
              help="Seconds without progress after which edge-train stops with an error: no answer, no place on "
                   "a full cloud, answers that make it ask again (retried with backoff), or a message that cannot "
                   "cross the emulated link in that time.")
@click.option("--bandwidth", default=None, metavar="RATE",
              help="Emulate an access link of this rate both ways, e.g. 10mbit (see --uplink/--downlink).")
@click.option("--uplink", default=None, metavar="RATE", help="Emulated uplink rate (edge -> cloud), e.g. 5mbit.")
@click.option("--downlink", default=None, metavar="RATE", help="Emulated downlink rate (cloud -> edge).")
@click.option("--latency", default="0ms", show_default=True, metavar="DURATION",
              help="Emulated one-way latency, e.g. 20ms.")
@click.option("--curve-secret", type=click.Path(dir_okay=False), default=None,
              help="This edge's CurveZMQ key pair (client-<i>.key_secret from `splitedge keys generate`).")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="The cloud's public key (server.key); with --curve-secret, traffic is encrypted.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal; log lines otherwise].")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between log lines when there is no progress bar.")
def main(artifacts, connect, data, client_id, num_clients, partition, epochs, steps, batch_size, eval_every,
         eval_samples, eval_batch_size, summary, lr, seed, checkpoint_dir, checkpoint_every, keep_checkpoints, resume, threads,
         backend, profile, request_timeout, give_up, bandwidth, uplink, downlink, latency, curve_secret, server_key, progress,
         log_every):
    """Train the edge half of split learning with ONNX Runtime.

    \b
    Each step: forward (ORT eval model), encode the activation with the cloud's
    codec, send it with the labels, receive and decode the gradient, ORT train
    step with that gradient, optimizer step.

    \b
    Example (two clients of one cloud):
      edge-train --artifacts artifacts/resnet18-cut3 --connect tcp://127.0.0.1:5555 \\
                 --data fashion-mnist --client-id 0 --num-clients 2 --epochs 1 --summary runs/c0.json
    """
    from ..export.manifest import ManifestError
    from ..wire import protocol as P
    from ..codecs import PayloadError
    from .client import (EdgeClient, EdgeConfig, EdgeError, EdgeInputError, Interrupted, RemoteError, ResumeMismatch,
                         SummaryError)
    from .data import DatasetError

    if epochs is not None and steps is not None:
        raise click.UsageError("give --epochs or --steps, not both")
    if client_id >= num_clients:
        raise click.BadParameter(f"must be below --num-clients ({num_clients})", param_hint="--client-id")
    if resume and not checkpoint_dir:
        raise click.BadParameter("--resume needs --checkpoint-dir", param_hint="--resume")
    if bool(curve_secret) != bool(server_key):
        raise click.BadParameter("--curve-secret and --server-key go together", param_hint="--curve-secret")
    from ..wire.shaping import parse_duration, parse_rate

    link = {}
    for hint, value in (("--uplink", uplink or bandwidth), ("--downlink", downlink or bandwidth)):
        try:
            link[hint] = parse_rate(value) if value else None
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=hint if value is not bandwidth else "--bandwidth") from None
    try:
        latency_s = parse_duration(latency)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--latency") from None
    if backend is None:  # the profile's, whose ONNX Runtime build decides what can train
        from ..profiles import load as load_profile

        backend = load_profile(profile).backend if profile is not None else "ort-training"
    if profile is not None:  # the profile's threads and batch size, unless given on the command line
        ctx = click.get_current_context()
        default = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
        threads = threads if ctx.get_parameter_source("threads") not in default else None
        batch_size = batch_size if ctx.get_parameter_source("batch_size") not in default else None
    else:
        threads = threads or None
    cfg = EdgeConfig(
        artifacts=artifacts, connect=connect, data=data, client_id=client_id, num_clients=num_clients,
        partition=partition, epochs=epochs or (None if steps else 1), steps=steps, batch_size=batch_size,
        eval_every=eval_every, eval_samples=eval_samples, eval_batch_size=eval_batch_size, summary=summary, lr=lr,
        seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, resume=resume,
        threads=threads, profile=profile, request_timeout_s=request_timeout, give_up_s=give_up, progress=progress,
        log_every=log_every, uplink_bps=link["--uplink"], downlink_bps=link["--downlink"], latency_s=latency_s,
        curve_secret=curve_secret, server_key=server_key, backend=backend,
    )
    import logging
    import os

    if not os.environ.get("SPLITEDGE_NO_LOG_SETUP"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        # onnxruntime's training build imports torch, whose INFO lines (e.g. "FakeTensor cache stats" at
        # exit) are not this program's: keep them out of the INFO level set for edge-train's own log
        logging.getLogger("torch").setLevel(logging.WARNING)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client = EdgeClient.prepare(cfg)
        for sig, handler in previous.items():
            if handler is not signal.SIG_IGN:  # e.g. SIGINT of a background job stays ignored
                signal.signal(sig, client.request_stop)
        result = client.run()
    except Interrupted as e:
        click.echo(f"edge-train: {e}", err=True)
        sys.exit(e.exit_code)
    except (ManifestError, DatasetError, ResumeMismatch, EdgeInputError) as e:
        raise UserError(str(e)) from None
    except SummaryError as e:  # the run completed: its result still goes to stdout
        _echo_result(e.summary)
        raise click.ClickException(str(e)) from None
    except (EdgeError, RemoteError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except (P.ProtocolError, PayloadError) as e:  # a message from the cloud that breaks the protocol
        raise click.ClickException(f"the cloud sent a malformed message: {e}") from None
    finally:  # main() may run inside another program (tests, a notebook): leave its handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _echo_result(result)


def _echo_result(result: dict) -> None:
    click.echo(json.dumps({k: result[k] for k in ("client_id", "final_accuracy", "steps", "bytes_sent",
                                                   "bytes_received", "wall_time_s")}))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
