"""``cloud-serve``: trains the server sub-model for many edge clients over ZeroMQ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .. import codecs as sc
from ..errors import MAX_THREADS, FiniteFloat, UserError
from ..fsutil import check_writable_dir, check_writable_file
from ..wire.transport import bind_endpoint_option

MAX_MESSAGE_MB = 1 << 20  # 1 TiB: far above any activation, within ZeroMQ's 64-bit message size


def parse_params(items: tuple[str, ...], option: str) -> dict:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, true/false), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        if key in out:
            raise click.BadParameter(f"{key} is given twice", param_hint=option)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def codec_params(name: str, bits: int | None, items: tuple[str, ...], option: str, bits_option: str) -> dict:
    params = parse_params(items, option)
    if bits is not None:
        params["bits"] = bits
    try:
        sc.get(name, **params)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=f"{option}/{bits_option}") from None
    return params


def _status_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from .status import parse_address

    try:
        parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--artifacts", "-a", required=True, type=click.Path(file_okay=False),
              help="Artifact directory written by export-client (the cloud reads server/ and manifest.json).")
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True, callback=bind_endpoint_option,
              help="ZeroMQ endpoint to listen on (tcp://HOST:PORT or ipc://PATH).")
@click.option("--codec", type=click.Choice(sc.available()), default="sgq", show_default=True,
              help="Codec of the activations (edge -> cloud). The cloud's settings are sent to every edge.")
@click.option("--bits", type=click.IntRange(1, 8), default=None,
              help="Bits of the activation codec [default: the codec's default].")
@click.option("--codec-param", multiple=True, metavar="KEY=VALUE",
              help="Further activation-codec parameter, e.g. groups=10 (repeatable).")
@click.option("--grad-codec", type=click.Choice(sc.available()), default=None,
              help="Codec of the gradients (cloud -> edge) [default: the activation codec and its settings].")
@click.option("--grad-bits", type=click.IntRange(1, 8), default=None, help="Bits of the gradient codec.")
@click.option("--grad-codec-param", multiple=True, metavar="KEY=VALUE",
              help="Further gradient-codec parameter (repeatable).")
@click.option("--calibration/--no-calibration", default=None,
              help="SGQ's gradient calibration (on by default with --codec sgq).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True,
              help="Optimizer of the server sub-model.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=0.01, show_default=True,
              help="Learning rate of the server sub-model.")
@click.option("--momentum", type=FiniteFloat(0, 1), default=0.0, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0, show_default=True, help="Weight decay.")
@click.option("--device", default="cpu", show_default=True, help="torch device of the server model (cpu, cuda, cuda:1).")
@click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True,
              help="torch intra-op threads (0: torch's default).")
@click.option("--fedavg-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Average the clients' edge weights every K of their steps (0: off).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where to keep checkpoints of the server model, optimizer and client progress (without "
                   "--resume: a directory that holds no checkpoints yet).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Checkpoint every N server steps (and at shutdown).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True,
              help="Checkpoints kept in --checkpoint-dir (older ones of this run are deleted; a checkpoint at the "
                   "server step of an earlier one replaces it; never files or checkpoints this run did not write or "
                   "resume from).")
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint LATEST names in --checkpoint-dir (checkpoints without a readable "
                   "LATEST are refused, with how to repair it): the server model, its optimizer's "
                   "state and settings, the clients' progress. --lr, --momentum or --weight-decay given here "
                   "replace the checkpoint's settings.")
@click.option("--metrics", type=click.Path(dir_okay=False), default=None,
              help="Append JSON lines (one per step, error, FedAvg round, checkpoint) to this file.")
@click.option("--client-timeout", type=FiniteFloat(min=0.1), default=60.0, show_default=True,
              help="Seconds of silence after which a client is timed out (the others are not held up).")
@click.option("--max-message-mb", type=FiniteFloat(min=0.001, max=MAX_MESSAGE_MB), default=256.0, show_default=True,
              help="Largest message accepted (ZeroMQ drops bigger ones before allocating them), and the largest "
                   "array a compressed activation may decode to.")
@click.option("--max-client-errors", type=click.IntRange(min=1), default=20, show_default=True,
              help="Bad messages from one client within --error-window before it is disconnected.")
@click.option("--error-window", type=FiniteFloat(min=0.1), default=60.0, show_default=True,
              help="Seconds over which --max-client-errors is counted.")
@click.option("--max-clients", type=click.IntRange(min=1), default=256, show_default=True,
              help="Clients served at once (not finished, not timed out); a HELLO for a new client id beyond "
                   "that is refused with server_full.")
@click.option("--expect-clients", type=click.IntRange(min=0), default=0, show_default=True,
              help="Number of clients of this run (with --exit-when-done).")
@click.option("--exit-when-done", is_flag=True, help="Exit once --expect-clients clients have said BYE.")
@click.option("--log-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Log a progress line every N server steps (0: never).")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed.")
@click.option("--curve-secret", type=click.Path(dir_okay=False), default=None,
              help="The cloud's CurveZMQ key pair (server.key_secret from `splitedge keys generate`): encrypt "
                   "all traffic and admit only --authorized-clients.")
@click.option("--authorized-clients", type=click.Path(file_okay=False), default=None,
              help="Directory of the public keys (*.key) of the edges allowed to join.")
@click.option("--status", "status", default=None, metavar="[HOST:]PORT", callback=_status_option,
              help="Serve a live status page (and its data at /status.json) on this HTTP address: PORT alone binds "
                   "127.0.0.1 (loopback), also when CurveZMQ keys are configured; 0 picks a free port. Read-only.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Write TensorBoard scalars (loss, accuracy, bytes, time per phase; per client and overall) to this "
                   "directory (needs the tensorboard package).")
def main(artifacts, bind, codec, bits, codec_param, grad_codec, grad_bits, grad_codec_param, calibration,
         optimizer, lr, momentum, weight_decay, device, threads, fedavg_every, checkpoint_dir, checkpoint_every,
         keep_checkpoints, resume, metrics, client_timeout, max_message_mb, max_client_errors, error_window, max_clients, expect_clients,
         exit_when_done,
         log_every, seed, curve_secret, authorized_clients, status, tensorboard):
    """Serve the cloud half of split training to many edge clients.

    \b
    One server sub-model (PyTorch) is shared by every client; each TRAIN message
    (a compressed activation and its labels) is one step of it, and the reply is
    the compressed gradient of that activation. The codec settings given here are
    authoritative: every edge receives them at HELLO.

    \b
    Example:
      cloud-serve --artifacts artifacts/resnet18-cut3 --bind tcp://127.0.0.1:5555 \\
                  --codec sgq --bits 4 --metrics runs/metrics.jsonl --checkpoint-dir runs/cloud
    """
    import torch

    from ..export import manifest as mf
    from .server import ServeConfig, serve

    for items, option, b, b_option in ((codec_param, "--codec-param", bits, "--bits"),
                                       (grad_codec_param, "--grad-codec-param", grad_bits, "--grad-bits")):
        given = parse_params(items, option).get("bits")
        if b is not None and given is not None and given != b:
            raise click.BadParameter(f"{b_option} {b} and {option} bits={given} disagree: give one of them",
                                     param_hint=b_option)
    params = codec_params(codec, bits, codec_param, "--codec-param", "--bits")
    if calibration is not None:
        if codec != "sgq":
            raise click.BadParameter("only SGQ has gradient calibration", param_hint="--calibration")
        params["calibrate"] = calibration
        codec_params(codec, None, tuple(f"{k}={json.dumps(v)}" for k, v in params.items()), "--calibration", "")
    gparams = None
    if grad_codec is not None or grad_bits is not None or grad_codec_param:
        gname = grad_codec or codec
        base = {} if grad_codec not in (None, codec) else {k: v for k, v in params.items() if k != "calibrate"}
        extra = parse_params(grad_codec_param, "--grad-codec-param")
        gparams = codec_params(gname, grad_bits, tuple(f"{k}={json.dumps(v)}" for k, v in {**base, **extra}.items()),
                               "--grad-codec-param", "--grad-bits")
    if resume and not checkpoint_dir:
        raise click.BadParameter("--resume needs --checkpoint-dir", param_hint="--resume")
    if bool(curve_secret) != bool(authorized_clients):
        raise click.BadParameter("--curve-secret and --authorized-clients go together", param_hint="--curve-secret")
    if exit_when_done and not expect_clients:
        raise click.BadParameter("--exit-when-done needs --expect-clients", param_hint="--exit-when-done")
    from .trainer import check_device

    try:
        check_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        mf.load(artifacts)
    except mf.ManifestError as e:
        raise UserError(str(e)) from None
    # where the server writes: checked now, not found out at the first checkpoint (or never)
    if checkpoint_dir:
        ck = Path(checkpoint_dir)
        if not resume and ck.is_dir() and ((ck / "LATEST").exists() or any(ck.glob("ckpt-*"))):
            # a fresh run would point LATEST at itself and prune the earlier run's checkpoints
            raise UserError(f"--checkpoint-dir {checkpoint_dir} holds the checkpoints of an earlier run: add --resume "
                            "to continue it, or choose another directory")
        try:
            check_writable_dir(checkpoint_dir)
        except OSError as e:
            raise UserError(f"--checkpoint-dir: {e.strerror or e}") from None
    if tensorboard:
        try:
            check_writable_dir(tensorboard)
        except OSError as e:
            raise UserError(f"--tensorboard: {e.strerror or e}") from None
        try:
            import tensorboard as _tb  # noqa: F401 - torch's SummaryWriter needs it
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if metrics:
        try:
            check_writable_file(metrics)
        except OSError as e:
            raise UserError(f"--metrics: {e.strerror or e}") from None
    cfg = ServeConfig(
        artifacts=artifacts, bind=bind, codec=sc.CodecSpec(codec, params),
        grad_codec=None if gparams is None else sc.CodecSpec(grad_codec or codec, gparams),
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        device=device, fedavg_every=fedavg_every, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, resume=resume, metrics=metrics, client_timeout_s=client_timeout,
        hparams_given=tuple(k for k in ("lr", "momentum", "weight_decay")
                            if click.get_current_context().get_parameter_source(k) is not ParameterSource.DEFAULT),
        max_message_bytes=int(max_message_mb * 1024 * 1024), max_client_errors=max_client_errors, error_window_s=error_window,
        max_clients=max_clients,
        expect_clients=expect_clients, exit_when_done=exit_when_done, log_every=log_every, seed=seed,
        curve_secret=curve_secret, authorized_clients=authorized_clients, status=status, tensorboard=tensorboard,
    )
    try:
        rc = serve(cfg)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    main()
