"""The serving contract of an exported CRN: the one place its names and rules are written down.

Used by the exporter (`export/`), crn-synthesize and crn-studio. Importing it needs no TensorFlow (crn-studio
in proxy mode runs without it); the functions that read folders import `tf.io.gfile` when called.

- Signatures: `serving_default` takes `label_ids` uint8 [N, H, W] and returns `image` uint8 [N, H, W, 3]
  (+ `images` uint8 [N, k, H, W, 3] for diverse models); `synthesize_png` takes `label_png_bytes` string [N]
  and returns `image_png_bytes` string [N].
- A version directory (`<export base>/<integer>/`) holds `saved_model.pb` and, in `assets.extra/`, the model's
  CRNConfig and label space as JSON; ONNX versions live under `<export base>/onnx/<integer>/`, their config,
  label space and graph kind in the ONNX metadata.
- Layout height and width must be positive multiples of the model's `size_multiple` (2^(modules - 1)).
"""

from __future__ import annotations

import posixpath

SERVING_DEFAULT = "serving_default"
SYNTHESIZE_PNG = "synthesize_png"
LABEL_IDS = "label_ids"
LABEL_PNG_BYTES = "label_png_bytes"
IMAGE = "image"
IMAGES = "images"
IMAGE_PNG_BYTES = "image_png_bytes"
# signature -> its single input (name, rank). label_ids is uint8, label_png_bytes a string tensor of PNG bytes.
CONTRACT = {SERVING_DEFAULT: (LABEL_IDS, 3), SYNTHESIZE_PNG: (LABEL_PNG_BYTES, 1)}
SIGNATURE_INPUTS = {name: spec[0] for name, spec in CONTRACT.items()}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# decode_png(dtype=uint8) keeps the high byte of 16-bit samples: ids 0..255 would all become 0.
SIXTEEN_BIT_PNG_MESSAGE = (
    "label_png_bytes: an element is a 16-bit PNG; layouts must be 8-bit PNGs "
    "(1-channel train ids 0..255, or label-space colours)"
)

# Files an export writes into its SavedModel's assets.extra/ for clients (TF Serving ignores them).
ASSETS_EXTRA = "assets.extra"
EXPORT_CONFIG_FILENAME = "crn_config.json"
EXPORT_LABEL_SPACE_FILENAME = "label_space.json"
SAVED_MODEL_FILENAME = "saved_model.pb"

# Metadata keys of the ONNX files crn-export writes (export.onnx_export), and the graphs they hold.
ONNX_DIR = "onnx"  # <export base>/onnx/<version>/
ONNX_CONFIG_KEY = "crn_config"  # CRNConfig as JSON
ONNX_LABEL_SPACE_KEY = "label_space"  # LabelSpace as JSON
ONNX_GRAPH_KEY = "crn_graph"  # one of:
ONNX_GRAPH_LABEL_IDS = "label_ids"  # model.onnx: label_ids uint8 [N, H, W] -> image(s) uint8
ONNX_GRAPH_LAYOUT = "layout"  # generator.onnx: layout float32 one-hot [N, H, W, C] -> image float32 [N, H, W, 3k]
ONNX_FILENAMES = ("model.onnx", "generator.onnx")


def fits_size_multiple(height: int, width: int, multiple: int) -> bool:
    """True if a layout of height x width can go through a CRN whose sides must be positive multiples of `multiple`."""
    return height >= multiple and width >= multiple and height % multiple == 0 and width % multiple == 0


def _gfile():
    import tensorflow as tf  # deferred: importing this module needs no TensorFlow

    return tf.io.gfile


def numbered_versions(folder: str) -> list[int]:
    """The integer-named entries of `folder` (the versions TF Serving would serve), ascending; [] if none."""
    gfile = _gfile()
    if not gfile.isdir(folder):
        return []
    names = (name.rstrip("/") for name in gfile.listdir(folder))
    return sorted(int(n) for n in names if n.isdigit())


def resolve_version_dir(path: str) -> tuple[str, int | None]:
    """A SavedModel version directory, or an export base whose newest numbered version is meant (as TF Serving
    picks it) -> (version directory, its version number; None when the directory's name is not a number).

    A path that is neither comes back as it is, with None: the caller says what it expected.
    """
    path = path.rstrip("/")
    if _gfile().exists(f"{path}/{SAVED_MODEL_FILENAME}"):
        name = posixpath.basename(path)
        return path, int(name) if name.isdigit() else None
    versions = numbered_versions(path)
    if versions:
        return f"{path}/{versions[-1]}", versions[-1]
    return path, None


def export_asset_paths(version_dir: str) -> tuple[str, str]:
    """The (CRNConfig, label space) JSON files of a version directory."""
    return (
        f"{version_dir}/{ASSETS_EXTRA}/{EXPORT_CONFIG_FILENAME}",
        f"{version_dir}/{ASSETS_EXTRA}/{EXPORT_LABEL_SPACE_FILENAME}",
    )


def resolve_onnx_path(path: str) -> str:
    """The ONNX file meant by `path`: the file itself, a version directory's model.onnx, or the newest
    version's model.onnx under `<export base>/onnx` (or under `path` itself, if it is that folder).

    Raises:
        ValueError: naming `path` and what was expected.
    """
    gfile = _gfile()
    path = path.rstrip("/")
    if not gfile.exists(path):
        raise ValueError(f"--onnx={path}: not found (expected an .onnx file, an export base or a version directory)")
    if not gfile.isdir(path):
        return path
    name = ONNX_FILENAMES[0]
    if gfile.exists(f"{path}/{name}"):  # a version directory
        return f"{path}/{name}"
    for folder in (f"{path}/{ONNX_DIR}", path):
        for version in reversed(numbered_versions(folder)):  # newest first (SavedModel versions have none)
            if gfile.exists(f"{folder}/{version}/{name}"):
                return f"{folder}/{version}/{name}"
    raise ValueError(
        f"--onnx={path}: no {name} found there (pass an .onnx file, a version directory such as "
        "exports/crn/onnx/1, or the export base exports/crn; export with crn-export --format=onnx)"
    )
