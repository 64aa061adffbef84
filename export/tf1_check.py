"""Runs an exported CRN the way TF Serving loads it: the TF1 SavedModel loader in a Session, tag `serve`.

There is no tensorflow_model_server binary in this environment; its SavedModel bundle loader is
this C++ loader (`LoadSavedModel` with the serve tag, then `Session::Run` on the signature's tensor
names), which `tf.compat.v1.saved_model.loader.load` wraps. `crn-export` runs

    python -m export.tf1_check EXPORT_DIR RESULTS.npz     # ~5 s for a tiny model; RESULTS `-`: stdout

in a fresh process (nothing of the exporting process's Keras objects can leak into the check; started
through export.child, so it ends with crn-export) to replay the export's warmup requests; it writes
every output as `<request>/<signature>/<output>`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from crn_tf.fileio import literal_path

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


class TF1Model:
    """A SavedModel loaded with the TF1 loader into its own graph and session."""

    def __init__(self, export_dir: str, tags: tuple[str, ...] = ("serve",)):
        self.export_dir = export_dir
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        # The loader's Saver globs `variables/variables`: under `run[1]/` or `a *b?/` it finds nothing.
        with self.graph.as_default(), literal_path(export_dir) as readable:
            self.meta_graph = tf.compat.v1.saved_model.loader.load(self.session, list(tags), readable)
        self.signatures = dict(self.meta_graph.signature_def)

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds `inputs` (by signature input name) and fetches every output of the signature.

        Raises:
            KeyError: unknown signature or input name.
            tf.errors.OpError / ValueError / TypeError: what the session raises for bad values.
        """
        if signature_name not in self.signatures:
            raise KeyError(f"{self.export_dir}: no signature {signature_name!r}; has {sorted(self.signatures)}")
        signature = self.signatures[signature_name]
        unknown = sorted(set(inputs) - set(signature.inputs))
        if unknown:
            expected = sorted(signature.inputs)
            raise KeyError(f"signature {signature_name!r} has no input(s) {unknown}; expects {expected}")
        feed = {signature.inputs[name].name: value for name, value in inputs.items()}
        fetch = {name: info.name for name, info in signature.outputs.items()}
        return self.session.run(fetch, feed)

    def close(self) -> None:
        self.session.close()


def read_warmup_requests(path: str) -> list:
    """The PredictionLog records of a TF Serving warmup file (TFRecord), as protos."""
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record)
        logs.append(log)
    return logs


def request_inputs(log) -> tuple[str, dict[str, np.ndarray]]:
    """(signature name, inputs as numpy) of a PredictionLog's predict request."""
    request = log.predict_log.request
    inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
    return request.model_spec.signature_name or "serving_default", inputs


def run_warmup(export_dir: str) -> dict[str, np.ndarray]:
    """Loads `export_dir` with the TF1 loader and runs its warmup requests; outputs by `i/signature/name`."""
    model = TF1Model(export_dir)
    results = {}
    try:
        for i, log in enumerate(read_warmup_requests(f"{export_dir}/{WARMUP_FILE}")):
            signature, inputs = request_inputs(log)
            for name, value in model.run(signature, inputs).items():
                results[f"{i}/{signature}/{name}"] = value
    finally:
        model.close()
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: python -m export.tf1_check EXPORT_DIR RESULTS.npz (got {argv[1:]})", file=sys.stderr)
        return 2
    from export.child import write_results

    write_results(argv[2], run_warmup(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
