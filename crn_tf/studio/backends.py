"""Where predictions come from: a SavedModel loaded in this process, or a running TF Serving.

Both answer the same three questions (status, metadata, predict) with TF Serving's REST JSON, and
both describe the model for the page (ModelInfo) from the export's assets.extra/ files.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import threading
import urllib.error
import urllib.request

import numpy as np

from crn_tf import labels, serving_contract
from crn_tf.config import CRNConfig
from crn_tf.studio import rest
from crn_tf.studio.batching import Batcher, BatchingOptions

SERVING_URL_RE = re.compile(r"^(?P<root>https?://[^/]+)/v1/models/(?P<name>[^/:]+)/?$")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the page and the request checks need to know about the served model.

    Attributes:
        name: the served model's name (the export base's directory name).
        version: the served version.
        config: the export's crn_config.json.
        label_space: the model's label space (the export's label_space.json).
    """

    name: str
    version: int
    config: CRNConfig
    label_space: labels.LabelSpace


class BackendError(Exception):
    """A failure with an HTTP status and a TF-Serving-style JSON body to relay."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", str(body)))
        self.status = status
        self.body = body


def _gfile():
    import tensorflow as tf  # deferred: importing this module needs no TensorFlow

    return tf.io.gfile


def resolve_version_dir(path: str) -> tuple[str, str, int]:
    """An export base (newest numbered version, as TF Serving picks it) or a version dir ->
    (version dir, model name, version).

    Raises:
        ValueError: no crn-export version is there.
    """
    path = path.rstrip("/")
    version_dir, version = serving_contract.resolve_version_dir(path)
    if version is None:
        raise ValueError(
            f"--saved_model={path}: no numbered SavedModel version in it; pass a crn-export base "
            "(e.g. exports/crn) or one of its versions (exports/crn/1)"
        )
    return version_dir, posixpath.basename(posixpath.dirname(version_dir)) or "crn", version


def read_model_info(version_dir: str, name: str, version: int) -> ModelInfo:
    """The export's assets.extra/crn_config.json and label_space.json."""
    gfile = _gfile()
    paths = serving_contract.export_asset_paths(version_dir)
    for p in paths:
        if not gfile.exists(p):
            raise ValueError(f"{version_dir}: not a crn-export SavedModel ({p} not found)")
    with gfile.GFile(paths[0], "r") as f:
        config = CRNConfig.from_dict(json.loads(f.read()))
    with gfile.GFile(paths[1], "r") as f:
        space = labels.LabelSpace.from_json(f.read(), source=paths[1])
    return ModelInfo(name, version, config, space)


class LocalBackend:
    """A crn-export SavedModel loaded in this process (`tf.saved_model.load`); one inference at a time,
    optionally batching concurrent requests into one call (`batching`, see crn_tf.studio.batching)."""

    def __init__(self, saved_model: str, batching: BatchingOptions | None = None):
        from crn_tf import fileio  # imports TensorFlow

        version_dir, name, version = resolve_version_dir(saved_model)
        self.info = read_model_info(version_dir, name, version)
        self.version_dir = version_dir
        self._loaded = fileio.load_saved_model(version_dir)  # literally: `run[1]/` is no pattern
        missing = sorted(set(rest.CONTRACT) - set(self._loaded.signatures))
        if missing:
            raise ValueError(f"{version_dir}: the SavedModel lacks the signature(s) {missing} of the serving contract")
        self._lock = threading.Lock()  # inference uses every core: one request at a time
        self._metadata = self._signature_defs(version_dir)
        self.batcher = Batcher(self.run, batching) if batching else None

    @staticmethod
    def _signature_defs(version_dir: str) -> dict:
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        saved_model = saved_model_pb2.SavedModel()
        with _gfile().GFile(f"{version_dir}/saved_model.pb", "rb") as f:
            saved_model.ParseFromString(f.read())
        signature_defs = saved_model.meta_graphs[0].signature_def
        # As TF Serving prints it: proto field names, empty fields included.
        return {
            name: json_format.MessageToDict(
                signature_defs[name], preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for name in sorted(signature_defs)
        }

    def _check_version(self, version: int | None) -> None:
        if version is not None and version != self.info.version:
            raise BackendError(404, {"error": f"Servable not found for request: Specific({self.info.name}, {version})"})

    def status(self, version: int | None = None) -> dict:
        self._check_version(version)
        return {
            "model_version_status": [
                {
                    "version": str(self.info.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def metadata(self, version: int | None = None) -> dict:
        self._check_version(version)
        return {
            "model_spec": {"name": self.info.name, "signature_name": "", "version": str(self.info.version)},
            "metadata": {"signature_def": {"signature_def": self._metadata}},
        }

    def run(self, request: rest.PredictRequest) -> dict[str, np.ndarray]:
        """Runs the signature; returns its outputs as numpy arrays. TF errors propagate."""
        import tensorflow as tf

        signature = self._loaded.signatures[request.signature_name]
        inputs = {k: tf.constant(v, tf.string if v.dtype == object else tf.uint8) for k, v in request.inputs.items()}
        with self._lock:
            outputs = signature(**inputs)
        return {k: v.numpy() for k, v in outputs.items()}

    def predict(self, request: rest.PredictRequest, body: bytes, version: int | None = None) -> tuple[int, dict]:
        import tensorflow as tf

        self._check_version(version)
        try:
            outputs = self.batcher.run(request) if self.batcher else self.run(request)
        except tf.errors.InvalidArgumentError as e:  # e.g. a corrupt PNG: what TF Serving answers too
            return 400, {"error": rest.tf_error_message(e.message)}
        return 200, rest.format_predict(outputs, request.row_format)


class RemoteBackend:
    """A running TF Serving (its REST port): requests are checked here, then forwarded as they came."""

    def __init__(self, serving_url: str, info: ModelInfo, timeout_s: float = 600.0):
        match = SERVING_URL_RE.match(serving_url)
        if not match:
            raise ValueError(f"--serving_url={serving_url!r}: expected http://HOST:PORT/v1/models/NAME")
        self.url = serving_url.rstrip("/")
        self.info = dataclasses.replace(info, name=match["name"])
        self.timeout_s = timeout_s

    def _call(self, url: str, body: bytes | None = None) -> tuple[int, dict]:
        """GET (or POST `body`) -> (status, JSON body); TF Serving's own errors are relayed as they are."""
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(502, {"error": f"TF Serving at {self.url} did not answer: {e}"}) from e
        try:
            return status, json.loads(data)
        except ValueError as e:
            raise BackendError(502, {"error": f"TF Serving at {self.url} answered {status} with non-JSON"}) from e

    def _versioned(self, version: int | None) -> str:
        return self.url if version is None else f"{self.url}/versions/{version}"

    def _get(self, url: str) -> dict:
        status, body = self._call(url)
        if status != 200:
            raise BackendError(status, body)
        return body

    def status(self, version: int | None = None) -> dict:
        return self._get(self._versioned(version))

    def metadata(self, version: int | None = None) -> dict:
        return self._get(self._versioned(version) + "/metadata")

    def predict(self, request: rest.PredictRequest, body: bytes, version: int | None = None) -> tuple[int, dict]:
        return self._call(self._versioned(version) + ":predict", body)
