"""Serving latency: the exported SavedModel and ONNX (onnxruntime) vs the Keras model, per image, at 256x512.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/serving.py                 # ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/serving.py --presets=tiny --iterations=20         # ~30 s

For each preset (random weights; `cityscapes_256p` with num_outputs=1 unless --num_outputs=0 keeps
the preset's k=9), builds the model, exports its signatures with keras.export.ExportArchive
(export.signatures, as crn-export does) and loads the SavedModel with tf.saved_model.load. Both
sides compute the same thing, train ids uint8 [N, H, W] -> uint8 images: the SavedModel's
`serving_default` signature and the Keras model under tf.function (synthesize_ids: one-hot, model,
clip and round). Keras and SavedModel calls alternate, so load from other jobs hits both alike;
the median of `iterations` timed calls per batch size is reported in ms per image, with
SavedModel / Keras. Each timed call ends when its result has been fetched to host memory as numpy,
so asynchronous devices (GPUs) cannot stop the clock early. Exit status 1 if the SavedModel is more
than 10 % slower anywhere.

What it measures: the SavedModel's signature is the *same* traced computation as the Keras side
(ExportArchive serialises that graph), so a ratio of ~1.00 is expected by construction. The
benchmark checks that exporting and loading add no overhead (no retracing, no extra copies, no lost
graph optimisation); it is not a comparison of two implementations. The onnxruntime side is one.

With `--onnx` (default; needs the `onnx` extra) a third side is timed in the same rotation: the
model.onnx that `crn-export --format=onnx` writes (export.onnx_export.convert: uint8 ids -> uint8
image, opset 17), run by onnxruntime's CPU provider with its default options. Its inputs are numpy
arrays made before the clock starts, as a client would hold them. ONNX rows are informational:
they do not change the exit status.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("presets", ["tiny", "cityscapes_256p"], "Presets to time.")
flags.DEFINE_string("size", "256x512", "HxW of the layouts.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("iterations", 10, "Timed calls per side and batch size (small presets).")
flags.DEFINE_integer("paper_iterations", 2, "Timed calls per side and batch size for paper-width presets.")
flags.DEFINE_integer("num_outputs", 1, "k for the presets (0: as the preset says).")
flags.DEFINE_bool("onnx", True, "Also time the ONNX export with onnxruntime (needs tf2onnx, onnxruntime).")
FLAGS = flags.FLAGS

MAX_SLOWDOWN = 1.10
LABELS = {"keras": "Keras", "saved": "SavedModel", "onnx": "onnxruntime"}


def time_call(fn, ids) -> float:
    """Seconds from the call to its result in host memory (numpy), so async devices are timed fully."""
    start = time.perf_counter()
    result = fn(ids)
    if hasattr(result, "numpy"):
        result.numpy()
    return time.perf_counter() - start


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from crn_tf.config import get_preset, parse_size
    from crn_tf.model import build_model
    from crn_tf.synthesize import synthesize_ids
    from export.signatures import build_export_archive

    h, w = parse_size(FLAGS.size)
    rows = []
    for name in FLAGS.presets:
        config = get_preset(name)
        if FLAGS.num_outputs:
            config = dataclasses.replace(config, num_outputs=FLAGS.num_outputs)
        model = build_model(config)
        keras_fn = tf.function(lambda ids, model=model: synthesize_ids(model, ids)[:, 0])
        with tempfile.TemporaryDirectory() as tmp:
            build_export_archive(model).write_out(tmp, verbose=False)
            loaded = tf.saved_model.load(tmp)
        serving = loaded.signatures["serving_default"]

        def saved_fn(ids, serving=serving):
            return serving(label_ids=ids)["image"]

        onnx_fn = None
        if FLAGS.onnx:
            import onnxruntime as ort

            from export.onnx_export import convert

            onnx_session = ort.InferenceSession(
                convert(model, "label_ids").SerializeToString(), providers=["CPUExecutionProvider"]
            )

            def onnx_fn(ids, session=onnx_session):
                return session.run(["image"], {"label_ids": ids})[0]

        iterations = FLAGS.iterations if max(config.widths) < 256 else FLAGS.paper_iterations
        rng = np.random.default_rng(0)
        for batch in (int(b) for b in FLAGS.batch_sizes):
            ids = tf.constant(rng.integers(0, config.num_classes, (batch, h, w)).astype(np.uint8))
            ids_np = ids.numpy()
            expected = keras_fn(ids).numpy().astype(int)  # + warm-up of each side
            np.testing.assert_allclose(saved_fn(ids).numpy(), expected, atol=1)
            sides = {"keras": (keras_fn, ids), "saved": (saved_fn, ids)}
            if onnx_fn is not None:
                np.testing.assert_allclose(onnx_fn(ids_np), expected, atol=1)
                sides["onnx"] = (onnx_fn, ids_np)
            times = {side: [] for side in sides}
            for _ in range(iterations):
                for side, (fn, inputs) in sides.items():
                    times[side].append(time_call(fn, inputs))
            ms = {side: 1000 * statistics.median(t) / batch for side, t in times.items()}
            rows.append((name, config.num_outputs, batch, iterations, ms))
            print(
                f"{name} batch {batch}: "
                + ", ".join(f"{LABELS[side]} {value:.1f} ms/image" for side, value in ms.items()),
                flush=True,
            )
        del loaded, serving, model, onnx_fn

    print(
        "\n| model | k | batch | timed calls | Keras ms/image | SavedModel ms/image | SavedModel / Keras "
        "| onnxruntime ms/image | onnxruntime / Keras |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, k, batch, n, ms in rows:
        onnx = f"{ms['onnx']:.1f} | {ms['onnx'] / ms['keras']:.2f}" if "onnx" in ms else "- | -"
        print(
            f"| {name} {h}x{w} | {k} | {batch} | {n} | {ms['keras']:.1f} | {ms['saved']:.1f} "
            f"| {ms['saved'] / ms['keras']:.2f} | {onnx} |"
        )
    worst = max(ms["saved"] / ms["keras"] for *_, ms in rows)
    verdict = "ok" if worst <= MAX_SLOWDOWN else "FAIL"
    print(f"\nworst SavedModel / Keras ratio {worst:.2f} (limit {MAX_SLOWDOWN:.2f}): {verdict}")
    if worst > MAX_SLOWDOWN:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
