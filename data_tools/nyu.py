"""NYU Depth v2, labelled subset: `nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5, read with h5py).

MATLAB stores arrays column-major, so in HDF5 the 1449 frames appear transposed:
`images` is [N, 3, W=640, H=480] uint8 and `labels` is [N, W, H] uint16 with the 894 raw classes
(0 = unlabeled). The raw classes are mapped to the 40 classes of Gupta et al. (CVPR 2013) with a
mapping file the user provides:

- `classMapping40.mat` from Gupta et al. (variable `mapClass`, 894 values in 1..40); a MATLAB v5
  file is read with scipy if installed, a v7.3 (HDF5) one with h5py;
- or a `.npy` / `.json` list of 894 ints (raw class k -> entry k-1) or 895 ints (raw class k ->
  entry k, entry 0 for unlabeled), values 1..40, 0 = void.

Train id = NYU40 id - 1; unlabeled and 0 -> void (255).
"""

from __future__ import annotations

import io
import json

import numpy as np
import tensorflow as tf

from crn_tf import labels
from data_tools.common import ConversionError, Item, LoadedPair, PairSource

NUM_RAW_CLASSES = 894


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("the nyu converter needs h5py: pip install h5py (or pip install 'crn_tf[nyu]')") from None
    return h5py


def load_mapping(path: str) -> np.ndarray:
    """Reads a raw-class -> NYU40 mapping file; returns uint8 [65536]: raw label value -> train id (255 void)."""
    if not tf.io.gfile.exists(path):
        raise ConversionError(path, "NYU class mapping file not found (--nyu_mapping)")
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    lower = path.lower()
    try:
        if lower.endswith(".json"):
            values = np.asarray(json.loads(raw.decode()))
        elif lower.endswith(".npy"):
            values = np.load(io.BytesIO(raw), allow_pickle=False)
        elif lower.endswith(".mat"):
            values = _read_mat_variable(raw, path, "mapClass")
        else:
            raise ConversionError(path, "unknown mapping file type; expected .mat, .npy or .json")
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(path, f"cannot read the class mapping ({e})") from None
    values = np.asarray(values).reshape(-1)
    if values.size not in (NUM_RAW_CLASSES, NUM_RAW_CLASSES + 1):
        raise ConversionError(path, f"mapping has {values.size} entries; expected 894 (raw 1..894) or 895 (raw 0..894)")
    if values.size == NUM_RAW_CLASSES:
        values = np.concatenate([[0], values])  # raw 0 = unlabeled
    if values.min() < 0 or values.max() > labels.NYU40.num_classes:
        raise ConversionError(path, f"mapping values range {values.min()}..{values.max()}; expected 0..40 (0 = void)")
    table = np.full(65536, labels.VOID_ID, np.uint8)
    mapped = values.astype(np.int64)
    table[: mapped.size] = np.where(mapped > 0, mapped - 1, labels.VOID_ID)
    return table


def load_indices(path: str) -> list[int]:
    """Reads frame indices (1-based, as the official splits.mat trainNdxs/testNdxs) from .json or .npy."""
    if not tf.io.gfile.exists(path):
        raise ConversionError(path, "index file not found (--nyu_indices)")
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    try:
        values = np.load(io.BytesIO(raw)) if path.lower().endswith(".npy") else np.asarray(json.loads(raw.decode()))
    except Exception as e:
        raise ConversionError(path, f"cannot read frame indices ({e}); expected a .json or .npy list of ints") from None
    values = values.reshape(-1)
    if values.size == 0 or values.dtype.kind not in "iu" or values.min() < 1:
        raise ConversionError(path, "expected a non-empty list of 1-based frame indices")
    return [int(v) for v in values]


def _read_mat_variable(raw: bytes, path: str, name: str) -> np.ndarray:
    if raw[:4] == b"\x89HDF" or raw[512:516] == b"\x89HDF":  # v7.3: HDF5 with a 512-byte user block
        with _h5py().File(io.BytesIO(raw), "r") as f:
            if name not in f:
                raise ConversionError(path, f"no variable {name!r} (found {sorted(f)})")
            return np.asarray(f[name])
    try:
        import scipy.io
    except ImportError:
        raise ConversionError(
            path, "MATLAB v5 .mat needs scipy (pip install scipy), or convert it once: python -c \"import "
            "scipy.io, numpy; numpy.save('map40.npy', scipy.io.loadmat('classMapping40.mat')['mapClass'].ravel())\""
        ) from None  # fmt: skip
    contents = scipy.io.loadmat(io.BytesIO(raw))
    if name not in contents:
        found = sorted(k for k in contents if not k.startswith("_"))
        raise ConversionError(path, f"no variable {name!r} (found {found})")
    return contents[name]


def make_source(mat_path: str, mapping_path: str, indices: list[int] | None = None) -> PairSource:
    """Lists the frames of `nyu_depth_v2_labeled.mat`.

    Args:
        mat_path: the labelled-subset .mat file (HDF5).
        mapping_path: raw 894 classes -> 40 mapping (see the module docstring).
        indices: 0-based frame indices to convert (e.g. the official train split); default all.
    """
    h5py = _h5py()
    table = load_mapping(mapping_path)
    if not tf.io.gfile.exists(mat_path):
        raise ConversionError(mat_path, "file not found; expected nyu_depth_v2_labeled.mat")
    try:
        handle = h5py.File(tf.io.gfile.GFile(mat_path, "rb") if "://" in mat_path else mat_path, "r")
    except OSError as e:
        raise ConversionError(mat_path, f"not an HDF5 (MATLAB v7.3) file ({e})") from None
    if "images" not in handle or "labels" not in handle:
        raise ConversionError(mat_path, f"expected datasets 'images' and 'labels', found {sorted(handle)}")
    images, label_sets = handle["images"], handle["labels"]
    if images.ndim != 4 or images.shape[1] != 3 or label_sets.shape != (images.shape[0], *images.shape[2:]):
        raise ConversionError(
            mat_path, f"images {images.shape} / labels {label_sets.shape}; expected [N, 3, W, H] / [N, W, H]"
        )
    count = images.shape[0]
    if not count:
        raise ConversionError(mat_path, "no frames in the file")
    indices = list(range(count)) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ConversionError(mat_path, f"frame indices {bad[:5]} out of range 0..{count - 1}")

    def load(item: Item) -> LoadedPair:
        # h5py serialises access with its own lock, so threads may share the handle.
        photo = np.ascontiguousarray(np.transpose(images[item.photo], (2, 1, 0)))  # [3, W, H] -> [H, W, 3]
        raw = np.asarray(label_sets[item.label]).T  # [W, H] -> [H, W] raw class ids
        return LoadedPair(photo.astype(np.uint8), table[raw.astype(np.int64)])

    items = [Item(f"nyu_{i + 1:04d}", i, i) for i in indices]
    info = {"input": mat_path, "mapping": mapping_path, "label_mapping": "894 raw classes -> NYU40 (Gupta et al.)"}
    return PairSource("nyu", labels.NYU40, items, load, info)
