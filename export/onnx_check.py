"""Runs an ONNX export of a CRN with onnxruntime, in a fresh process, for `crn-export --format=onnx`.

    python -m export.onnx_check EXPORT_DIR INPUTS.npz RESULTS.npz     # ~1 s for a tiny model; `-`: stdin/stdout

Loads `model.onnx` and `generator.onnx` from EXPORT_DIR (a version directory) as a runtime without
TensorFlow would, feeds `label_ids` (uint8 [N, H, W]) to the first and `layout` (float32 one-hot
[N, H, W, C]) to the second, and writes every output as `<graph>/<output>` to RESULTS.npz, where
graph is the file's `crn_graph` metadata (`label_ids` or `layout`). Only numpy and onnxruntime are
imported (TensorFlow only to read an object-store path), so the check needs nothing the export
process had in memory.
"""

from __future__ import annotations

import sys

import numpy as np

GRAPH_FILES = {"label_ids": "model.onnx", "layout": "generator.onnx"}


def read_bytes(path: str) -> bytes:
    """A file's bytes; object-store paths (`gs://...`) through tf.io.gfile."""
    if "://" in path:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def run_export(export_dir: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs each graph of the version directory on its input; outputs by `<graph>/<output name>`."""
    import onnxruntime as ort

    results = {}
    for graph, name in GRAPH_FILES.items():
        session = ort.InferenceSession(read_bytes(f"{export_dir}/{name}"), providers=["CPUExecutionProvider"])
        if session.get_modelmeta().custom_metadata_map.get("crn_graph") != graph:
            raise ValueError(f"{export_dir}/{name}: metadata crn_graph is not {graph!r}")
        outputs = [o.name for o in session.get_outputs()]
        for output, value in zip(outputs, session.run(outputs, {graph: inputs[graph]})):
            results[f"{graph}/{output}"] = value
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(f"usage: python -m export.onnx_check EXPORT_DIR INPUTS.npz RESULTS.npz (got {argv[1:]})", file=sys.stderr)
        return 2
    from export.child import read_inputs, write_results

    write_results(argv[3], run_export(argv[1], read_inputs(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
