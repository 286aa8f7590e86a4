"""``export-client``: the client sub-model as ONNX on-device training artifacts."""

from __future__ import annotations

import sys
import time

import click

from ..errors import FiniteFloat, InputShape, UserError
from . import zoo_names


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "-m", required=True, type=click.Choice(zoo_names.MODEL_NAMES),
              help="Architecture from the model zoo (torchvision-compatible state_dict keys).")
@click.option("--cut", default=None, metavar="N|NAME",
              help="Keep the first N cut units on the edge, or cut after the unit NAME. See --list-cuts.")
@click.option("--list-cuts", is_flag=True,
              help="Print every cut (unit name, activation shape, edge parameters, bytes per sample) and exit.")
@click.option("--input-shape", type=InputShape(), default="1,28,28", show_default=True,
              help="Per-sample input C,H,W; the first convolution takes C channels (1,28,28 for Fashion-MNIST).")
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True,
              help="Output size of the classification head.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Initial weights: a torchvision-style state_dict as .safetensors, or a torch .pth/.pt "
                   "(read with weights_only=True, no code executed). A 3-channel stem is adapted to C; "
                   "a head of a different size is re-initialised.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="Edge optimizer. sgd: plain SGD, no momentum. adamw: ORT's AdamW, the Hugging Face "
                   "formula (betas 0.9,0.999, eps 1e-6, bias correction, decoupled weight decay); it "
                   "differs from torch.optim.AdamW by ~1e-3 relative after one step.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=0.01, show_default=True,
              help="Edge learning rate (stored in the manifest; edge-train may override).")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Weight decay: AdamW's decoupled one; for SGD on the portable backend torch's L2 term.")
@click.option("--momentum", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="SGD momentum (torch.optim.SGD's formula; the portable backend only: ORT training's SGD has "
                   "none and refuses artifacts with momentum).")
@click.option("--opset", type=click.IntRange(13, 17), default=13, show_default=True,
              help="ONNX opset of the portable graphs in client/portable/ (13, IR 7: what TensorRT 8.2, Ascend "
                   "ATC and ONNX Runtime 1.10+ accept; higher opsets get IR 8).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weight initialisation.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Artifact directory [default: artifacts/<model>-cut<N>].")
@click.option("--force", is_flag=True,
              help="Replace an existing --out artifact directory, with everything in it (never a directory without "
                   "manifest.json).")
@click.option("--quiet", "-q", is_flag=True, help="Only print errors.")
def main(model, cut, list_cuts, input_shape, num_classes, weights, optimizer, lr, weight_decay, momentum, opset, seed,
         out, force, quiet):
    """Export the edge part of MODEL cut at --cut for both edge backends.

    \b
    ort-training: ONNX Runtime on-device training artifacts (onnxruntime-training 1.19.2).
    portable: plain ONNX graphs for any ONNX Runtime (or TensorRT/CANN), derived from the
    PyTorch module by AOTAutograd; BatchNorm and the optimizers follow torch exactly.

    \b
    Writes, atomically (all or nothing), into --out:
      client/training_model.onnx   inputs `input`, `grad_activation`; outputs loss, `activation`
      client/eval_model.onnx       train-mode forward: the activation sent to the cloud
      client/inference_model.onnx  eval-mode forward (BatchNorm running statistics)
      client/optimizer_model.onnx  SGD or AdamW
      client/checkpoint            edge parameters (ORT checkpoint)
      client/portable/             the portable backend: plain ONNX graphs (default domain, --opset):
                                   forward_train.onnx, backward.onnx, inference.onnx, params.npz
      server/model.safetensors     the cloud part's weights (torchvision key names)
      manifest.json                shapes, optimizer, opset, versions, sha256 of every file

    \b
    Examples:
      export-client --model resnet18 --cut 3
      export-client --model resnet18 --list-cuts --input-shape 3,32,32
      export-client --model vgg11 --cut features.5 --input-shape 3,32,32 --optimizer adamw --lr 1e-3
    """
    from . import onnx_export, split  # torch is imported only past argument parsing

    req_cut = cut
    if not list_cuts and cut is None:
        raise click.UsageError("missing --cut N|NAME (or --list-cuts to see them)")
    if lr <= 0:
        raise click.BadParameter(f"must be positive, got {lr}", param_hint="--lr")
    req = onnx_export.ExportRequest(
        model=model, cut=req_cut if req_cut is not None else 1, input_shape=input_shape,
        num_classes=num_classes, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        out=out, force=force, weights=weights, seed=seed, momentum=momentum, opset=opset,
    )
    try:
        if list_cuts:
            _, _, infos, _ = onnx_export.prepare(req)
            click.echo(f"{model}, input {'x'.join(map(str, input_shape))}, {num_classes} classes")
            click.echo(split.format_cut_table(infos))
            return
        t0 = time.perf_counter()
        log = (lambda s: None) if quiet else (lambda s: click.echo(f"export-client: {s}", err=True))
        path, m = onnx_export.export(req, log)
    except onnx_export.ExportError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"writing the artifacts failed, nothing was written: {e}") from None
    if not quiet:
        click.echo(
            f"wrote {path}/ in {time.perf_counter() - t0:.1f}s: {m.model} cut {m.cut} (after {m.cut_name}), "
            f"activation {'x'.join(map(str, m.activation_shape))} per sample "
            f"({4 * _prod(m.activation_shape):,} bytes fp32), {m.extra['edge_params']:,} edge parameters, "
            f"optimizer {m.optimizer.name} lr {m.optimizer.lr:g}"
        )


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
