"""Where SGQ's 4-bit encode of a 32x64x16x16 activation spends its time, against its floor.

Run:  splitedge bench sgq-floor [--repeat 200]

Prints, measured in one process (medians of --repeat runs):

* the whole ``sgq`` encode (defaults: 10 groups, 512-stripe fit sample, 4 Lloyd iterations);
* the nearest-centroid assignment of every stripe alone (``kmeans.nearest``, blocked as in
  ``vq.stripe_vq``), split into its matrix product and the packed-index min (and, or, min);
* the matrix product's FLOP rate: the product is the arithmetic every exact assignment must do
  (82k stripes x 16 centroids x 9 augmented features), so at a rate near one core's peak no
  numpy rewrite can make it cheaper;
* the same assignment through ONNX Runtime (MatMul + ArgMin over the centroids, 1 and 2 threads):
  the edge's one compiled dependency, as a candidate kernel. Its labels are checked equal to numpy's.

Issue 3's target is "SGQ 4-bit encode under 10% of the ORT edge step" (``splitedge bench step``:
about 8.6 ms for ResNet-18 cut 3, batch 32, 3x32x32 on the 2-vCPU test machine). This script
shows how much of the encode is the assignment every stripe needs, whatever the fit costs.
"""

from __future__ import annotations

import click
import numpy as np

from .step import _median_ms as median_ms


def activation(rng: np.random.Generator) -> np.ndarray:
    """A ReLU-like activation of ResNet-18 cut 3 at batch 32, 3x32x32 (32x64x16x16)."""
    return np.maximum(rng.standard_normal((32, 64, 16, 16)).astype(np.float32) * 0.5 + 0.1, 0)


def ort_argmin_session(g: int, k: int, d2: int, m: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "U"], ["S"]), helper.make_node("ArgMin", ["S"], ["L"], axis=2, keepdims=0)],
        "assign",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [g, m, d2]),
         helper.make_tensor_value_info("U", TensorProto.FLOAT, [g, d2, k])],
        [helper.make_tensor_value_info("L", TensorProto.INT64, [g, m])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@click.command("sgq-floor", help=__doc__.split("\n\n")[0])
@click.option("--repeat", type=click.IntRange(min=1), default=200, show_default=True,
              help="timed runs per figure (median)")
def main(repeat: int) -> None:

    from ... import codecs as sc
    from ...codecs import kmeans, sgq, vq

    rng = np.random.default_rng(0)
    x = activation(rng)
    codec = sc.get("sgq", bits=4)
    assert isinstance(codec, sgq.SGQ)
    enc_ms = median_ms(lambda: codec.encode(x), repeat)

    # the assignment as stripe_vq runs it, on the centroids of the last encode
    x3 = x.reshape(32, 64, -1)
    n, c, s = x3.shape
    sig, warm = codec.last_significance, codec._warm
    if sig is None or warm is None:
        raise RuntimeError("the sgq encode kept no significance or centroids")
    perm, sizes = codec.grouping(sig, c)
    idx, valid = vq.padded_index(perm, sizes)
    wpad = np.where(valid, sig[idx], 0.0).astype(np.float32)
    g, dmax = idx.shape
    m = n * s
    xa = np.empty((g, dmax + 2, m), np.float32)
    xa[:, :dmax] = x3.transpose(1, 0, 2)[idx.reshape(-1)].reshape(g, dmax, m)
    xa[:, dmax] = 1.0
    kmeans.augment(xa[:, :dmax], wpad, out=xa, ones=False)
    U = warm[1]  # the centroids of the last encode (kept for its warm start)
    Ua = kmeans.centroid_rows(U, wpad)
    k = Ua.shape[1]
    step = max(1, vq._ASSIGN_BLOCK // (g * k))
    blocks = [(a, min(m, a + step)) for a in range(0, m, step)]

    def assign():
        return np.concatenate([kmeans.nearest(Ua, xa[:, :, a:b]) for a, b in blocks], axis=1)

    def products():
        for a, b in blocks:
            np.matmul(Ua, xa[:, :, a:b])

    labels = assign()
    assign_ms = median_ms(assign, repeat)
    mm_ms = median_ms(products, repeat)
    flops = 2.0 * g * k * (dmax + 2) * m
    ref = np.empty_like(x)
    copy_ms = median_ms(lambda: np.copyto(ref, x), repeat)

    print(f"numpy {np.__version__}; SGQ 4-bit, {g} groups of <= {dmax} channels, {m} stripes, {k} centroids")
    print(f"{'np.copyto of the activation (reference)':52s} {copy_ms:8.3f} ms")
    print(f"{'sgq encode, whole':52s} {enc_ms:8.3f} ms")
    print(f"{'  nearest-centroid assignment of every stripe':52s} {assign_ms:8.3f} ms  "
          f"{assign_ms / enc_ms:6.1%} of the encode")
    print(f"{'    of which the distance matrix product':52s} {mm_ms:8.3f} ms  "
          f"{flops / 1e6:.1f} MFLOP at {flops / mm_ms / 1e6:.1f} GFLOP/s")
    print(f"{'    and the packed-index min (and, or, min)':52s} {assign_ms - mm_ms:8.3f} ms")

    XT = np.ascontiguousarray(xa.transpose(0, 2, 1))
    UT = np.ascontiguousarray(Ua.transpose(0, 2, 1))
    for threads in (1, 2):
        sess = ort_argmin_session(g, k, dmax + 2, m, threads)
        got = sess.run(None, {"X": XT, "U": UT})[0]
        # ORT's sums may round differently: only exact near-ties may go to the other centroid
        agree = float((got == labels).mean())
        if agree < 0.999:
            raise SystemExit(f"ONNX Runtime's labels agree with numpy's on only {agree:.2%} of the stripes")
        ort_ms = median_ms(lambda sess=sess: sess.run(None, {"X": XT, "U": UT}), repeat)
        print(f"{f'  the same assignment in ONNX Runtime, {threads} thread(s)':52s} {ort_ms:8.3f} ms  "
              f"{ort_ms / assign_ms:5.2f}x numpy's; labels agree on {agree:.2%}")


if __name__ == "__main__":
    main()
