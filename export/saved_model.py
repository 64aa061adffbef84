"""SavedModel + TF Serving export of a CRN: versioned, verified, atomic.

`export_saved_model(model, "exports/crn")` writes `exports/crn/<version>/`:

    saved_model.pb, variables/        the two signatures (export.signatures)
    assets.extra/tf_serving_warmup_requests   PredictionLog records for both signatures
    assets.extra/crn_config.json, label_space.json   for clients (crn-synthesize --saved_model)

through a temporary sibling directory (`<version>.tmp-...`, which TF Serving ignores: not an
integer) that is renamed into place only after a fresh process has loaded it with the TF1
SavedModel loader, as TF Serving does, and its warmup outputs matched the Keras model's within 1.
Then `models.config` (a model_config_list text proto) is written beside the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import posixpath
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels
from crn_tf.png import decode_png_rgb, encode_png
from crn_tf.serving_contract import export_asset_paths, fits_size_multiple
from crn_tf.serving_graph import synthesize_ids
from export import child, signatures, versions
from export.tf1_check import WARMUP_FILE
from export.versions import existing_versions, next_version  # noqa: F401 - part of this module's API

MODELS_CONFIG = "models.config"
# Outputs of the exported graph and of the Keras model may differ by float round-off, which can
# flip a rounding: 1 grey level is allowed, as the serving contract says.
MAX_ABS_DIFF = 1
VERIFY_TIMEOUT_S = 1800
T = TypeVar("T")


class ExportVerificationError(RuntimeError):
    """The export did not load with the TF1 loader, or its outputs disagreed with the Keras model."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_saved_model` wrote.

    Attributes:
        export_dir: the version directory, `<export_base>/<version>`.
        version: the version number.
        model_name: the served model's name (the base directory's name).
        models_config: path of the model_config_list file beside the base.
        warmup_size: (height, width) of the warmup requests.
        max_abs_diff: largest difference (grey levels) between the TF1-loaded export and Keras.
    """

    export_dir: str
    version: int
    model_name: str
    models_config: str
    warmup_size: tuple[int, int]
    max_abs_diff: int


def warmup_label_ids(size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A deterministic layout uint8 [H, W] with every class and void: diagonal bands of ids."""
    h, w = size
    band = max(1, (h + w) // (2 * (num_classes + 1)))
    y, x = np.mgrid[0:h, 0:w]
    ids = ((x + y) // band) % (num_classes + 1)
    return np.where(ids == num_classes, labels.VOID_ID, ids).astype(np.uint8)


def warmup_requests(model_name: str, config, size: tuple[int, int]) -> list:
    """PredictionLog protos for both signatures at `size`: one id layout; the same layout as a colour
    PNG and as an id PNG."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    space = config.get_label_space()
    ids = warmup_label_ids(size, config.num_classes)  # [H, W]
    inputs = {
        signatures.SERVING_DEFAULT: ids[None],  # [1, H, W] uint8
        signatures.SYNTHESIZE_PNG: np.array(
            [encode_png(labels.ids_to_colors(ids, space)), encode_png(ids)], object
        ),  # [2]
    }
    logs = []
    for signature_name, value in inputs.items():
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
        )
        request.inputs[signatures.SIGNATURE_INPUTS[signature_name]].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup(export_dir: str, model_name: str, config, size: tuple[int, int]) -> str:
    """Writes `assets.extra/tf_serving_warmup_requests` (TFRecord of PredictionLog) into export_dir."""
    path = f"{export_dir}/{WARMUP_FILE}"
    tf.io.gfile.makedirs(posixpath.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for log in warmup_requests(model_name, config, size):
            writer.write(log.SerializeToString())
    return path


def run_tf1_check(export_dir: str) -> dict[str, np.ndarray]:
    """Runs the export's warmup requests through the TF1 loader in a fresh Python process (export.child:
    it ends with this process, and its results come back through a pipe: no temporary files)."""
    try:
        status, out, err = child.run_child("export.tf1_check", [export_dir, "-"], timeout_s=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportVerificationError(f"{export_dir}: the TF1-loader check took over {VERIFY_TIMEOUT_S} s") from e
    if status != 0:
        raise ExportVerificationError(
            f"{export_dir}: the TF1 SavedModel loader (as TF Serving loads it) failed on the export "
            f"(exit {status}):\n{err[-4000:]}"
        )
    return child.read_npz(out, allow_pickle=True)  # our own subprocess's output: string tensors are objects


def verify_export(export_dir: str, model) -> int:
    """Checks that the export, loaded as TF Serving loads it, gives the Keras model's images.

    Returns:
        The largest absolute difference found (grey levels).

    Raises:
        ExportVerificationError: the load or a request failed, an output is missing, or an image
            differs by more than MAX_ABS_DIFF.
    """
    from export.tf1_check import read_warmup_requests, request_inputs

    results = run_tf1_check(export_dir)
    space = model.crn_config.get_label_space()
    worst = 0
    for i, log in enumerate(read_warmup_requests(f"{export_dir}/{WARMUP_FILE}")):
        signature, inputs = request_inputs(log)
        if signature == signatures.SERVING_DEFAULT:
            ids = inputs["label_ids"]
            collection = synthesize_ids(model, ids).numpy()  # [N, k, H, W, 3]
            expected = {"image": collection[:, 0]}
            if model.crn_config.num_outputs > 1:
                expected["images"] = collection
            got = {name: results.get(f"{i}/{signature}/{name}") for name in expected}
        else:
            pngs = inputs["label_png_bytes"]
            ids = np.stack([labels.decode_label_image(p, space, source=f"warmup request {i}") for p in pngs])
            expected = {"image_png_bytes": synthesize_ids(model, ids).numpy()[:, 0]}
            encoded = results.get(f"{i}/{signature}/image_png_bytes")
            got = {"image_png_bytes": None if encoded is None else np.stack([decode_png_rgb(p) for p in encoded])}
        for name, want in expected.items():
            have = got[name]
            if have is None or have.shape != want.shape or have.dtype != np.uint8:
                raise ExportVerificationError(
                    f"{export_dir}: warmup request {i} ({signature}) output {name!r} is "
                    f"{None if have is None else (have.shape, have.dtype)}, expected uint8 {want.shape}"
                )
            diff = int(np.max(np.abs(have.astype(np.int32) - want.astype(np.int32)), initial=0))
            if diff > MAX_ABS_DIFF:
                raise ExportVerificationError(
                    f"{export_dir}: warmup request {i} ({signature}) output {name!r} differs from the Keras "
                    f"model by up to {diff} grey levels (allowed {MAX_ABS_DIFF})"
                )
            worst = max(worst, diff)
    return worst


def write_models_config(export_base: str, model_name: str, base_path: str) -> str:
    """Adds (or updates) `model_name` in the model_config_list file beside the base; returns its path.

    Other models already listed there are kept, so several exports can share one TF Serving.
    """

    directory = posixpath.dirname(export_base.rstrip("/")) or "."
    path = f"{directory}/{MODELS_CONFIG}"
    with _directory_lock(directory):  # concurrent exports of other models into this folder: no lost entries
        _update_models_config(path, model_name, base_path)
    return path


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    """An exclusive flock on a local directory itself (nothing is left behind); a no-op on object stores."""
    if not _is_local(directory):
        yield
        return
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _update_models_config(path: str, model_name: str, base_path: str) -> None:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    server_config = model_server_config_pb2.ModelServerConfig()
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "r") as f:
            try:
                text_format.Parse(f.read(), server_config)
            except text_format.ParseError as e:
                raise ValueError(f"{path}: not a TF Serving model config text proto ({e}); move it away") from e
    entries = server_config.model_config_list.config
    entry = next((c for c in entries if c.name == model_name), None) or entries.add()
    entry.name = model_name
    entry.base_path = base_path
    entry.model_platform = "tensorflow"
    fileio.atomic_write(path, text_format.MessageToString(server_config))


_is_local = versions.is_local


def serving_base_path(export_base: str, model_name: str) -> str:
    """base_path for models.config: inside the docker container for local bases, else the URL itself."""
    return f"/models/{model_name}" if _is_local(export_base) else export_base


def _write_version(model, tmp_dir: str, model_name: str, warmup_size: tuple[int, int]) -> None:
    signatures.build_export_archive(model).write_out(tmp_dir, verbose=False)
    config = model.crn_config
    write_warmup(tmp_dir, model_name, config, warmup_size)
    config_path, space_path = export_asset_paths(tmp_dir)
    fileio.write_json(config_path, config.to_dict())
    space = config.get_label_space()
    fileio.atomic_write(space_path, space.to_json() + "\n")


def write_version_atomically(
    export_base: str,
    write: Callable[[str], T],
    version: int | None = None,
    overwrite: bool = False,
    created_parents: Sequence[str] = (),
) -> tuple[int, T]:
    """Claims a version of `export_base`, runs `write(tmp_dir)` on a temporary sibling of its directory,
    then renames that into place.

    What killed exports left in the base is removed first; then the claim (export.versions) gives
    concurrent exports distinct versions and refuses an explicit version another export is writing. Without
    `overwrite` nothing existing is replaced, even by a race. `created_parents` (outermost first; the
    base among them) are created first. If `write` raises (or anything is interrupted), the temporary
    directory and the claim are removed, and so is every directory created here (those parents and
    their missing ancestors) that is empty again: a failed export leaves the file system as it was. An
    existing version directory (overwrite) is kept until the new one is in place.

    Returns:
        (the version written, what `write` returned).

    Raises:
        ValueError: the version exists and `overwrite` is False, or another export is writing it.
    """
    created = []  # directories makedirs will create, innermost last
    for parent in (*created_parents, export_base):
        missing = []
        while parent and parent not in created and not tf.io.gfile.exists(parent):
            missing.append(parent)
            parent = posixpath.dirname(parent)
        created.extend(reversed(missing))
    tmp_dir = None
    try:
        for parent in (*created_parents, export_base):
            tf.io.gfile.makedirs(parent)
        # First: an interrupted --overwrite's old version goes back in place before versions are counted.
        versions.remove_stale_temporaries(export_base)
        with versions.claim_version(export_base, version, overwrite) as claim:
            tmp_dir = fileio.temporary_name(claim.final_dir)  # `<version>.tmp-...`: not a version to TF Serving
            try:
                result = write(tmp_dir)
                versions.rename_into_place(tmp_dir, claim.final_dir, overwrite)
            except BaseException:
                if tf.io.gfile.exists(tmp_dir):
                    tf.io.gfile.rmtree(tmp_dir)
                raise
        return claim.version, result
    except BaseException:
        for directory in reversed(created):  # innermost first, once the claim's lock file is gone
            if tf.io.gfile.isdir(directory) and not tf.io.gfile.listdir(directory):
                tf.io.gfile.rmtree(directory)  # we created it and it is empty again
        raise


def check_warmup_size(config, warmup_size: tuple[int, int] | None) -> tuple[int, int]:
    """The warmup size (default: the model's native size), checked against the model's size multiple."""
    h, w = tuple(warmup_size or config.native_size)
    m = config.size_multiple
    if not fits_size_multiple(h, w, m):
        raise ValueError(
            f"--warmup_size={h}x{w}: CRN {config.name!r} needs height and width that are multiples of {m} "
            f"(native size {config.native_size[0]}x{config.native_size[1]})"
        )
    return h, w


def export_saved_model(
    model,
    export_base: str,
    version: int | None = None,
    warmup_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Exports `model` (a CascadedRefinementNetwork) to `export_base/<version>/` for TF Serving.

    Args:
        model: the generator to export.
        export_base: the model's base directory (its name is the served model's name).
        version: version number; default: one more than the largest existing one (or 1), skipping those
            that concurrent exports are writing.
        warmup_size: (height, width) of the warmup requests; default: the model's native size.
        overwrite: replace an existing version directory instead of refusing.

    Returns:
        An ExportResult.

    Raises:
        ValueError: bad version or warmup size, the version exists and `overwrite` is False, or another
            export is writing that version.
        ExportVerificationError: the check with the TF1 loader failed; nothing was left behind.
    """
    config = model.crn_config
    export_base = export_base.rstrip("/")
    model_name = posixpath.basename(export_base)
    if not model_name:
        raise ValueError(f"--export_base={export_base!r} needs a final directory name: the served model's name")
    warmup_size = h, w = check_warmup_size(config, warmup_size)
    if version is not None and version < 1:
        raise ValueError(f"--version must be a positive integer, got {version}")

    def write_and_verify(tmp_dir: str) -> int:
        _write_version(model, tmp_dir, model_name, warmup_size)
        return verify_export(tmp_dir, model)

    version, max_diff = write_version_atomically(export_base, write_and_verify, version, overwrite)
    final_dir = f"{export_base}/{version}"
    models_config = write_models_config(export_base, model_name, serving_base_path(export_base, model_name))
    return ExportResult(final_dir, version, model_name, models_config, (h, w), max_diff)


def serving_instructions(result: ExportResult) -> str:
    """The docker command that serves the export, and REST / gRPC example requests."""
    base = posixpath.dirname(result.export_dir)
    name = result.model_name
    if _is_local(base):
        root = os.path.abspath(posixpath.dirname(base) or ".")
        docker = (
            f'docker run --rm -p 8500:8500 -p 8501:8501 -v "{root}:/models" tensorflow/serving \\\n'
            f"    --model_config_file=/models/{MODELS_CONFIG}"
        )
    else:
        docker = (
            f"docker run --rm -p 8500:8500 -p 8501:8501 tensorflow/serving \\\n"
            f"    --model_name={name} --model_base_path={base}   # plus credentials for the object store"
        )
    h, w = result.warmup_size
    return f"""Exported {result.export_dir} (version {result.version}; TF1-loader check: max difference \
{result.max_abs_diff} grey level(s) from the Keras model). Model config: {result.models_config}

Serve it (gRPC on 8500, REST on 8501):
{docker}

REST, layout PNG in, photo PNG out (signature synthesize_png):
curl -s http://localhost:8501/v1/models/{name}:predict -d '{{"signature_name": "synthesize_png", \
"instances": [{{"label_png_bytes": {{"b64": "'"$(base64 -w0 layout.png)"'"}}}}]}}' \\
    | jq -r '.predictions[0].b64' | base64 -d > photo.png

REST, label ids in, uint8 RGB out (serving_default; ids: {h}x{w} nested lists of train ids, 255 = void):
curl -s http://localhost:8501/v1/models/{name}:predict -d '{{"inputs": {{"label_ids": [[[0, 0, ...], ...]]}}}}'

gRPC (Python, tensorflow-serving-api):
import grpc, numpy as np, tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel("localhost:8500"))
request = predict_pb2.PredictRequest()
request.model_spec.name, request.model_spec.signature_name = "{name}", "serving_default"
request.inputs["label_ids"].CopyFrom(tf.make_tensor_proto(np.zeros([1, {h}, {w}], np.uint8)))
image = tf.make_ndarray(stub.Predict(request, 60.0).outputs["image"])  # uint8 [1, {h}, {w}, 3]
"""
