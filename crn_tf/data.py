"""The TFRecord example schema (encode + parse) and the tf.data training pipeline.

Schema (one `tf.train.Example` per layout/photo pair; keys as in TF Model Garden / DeepLab, so
existing DeepLab segmentation TFRecords load too):

    image/encoded                       bytes   PNG or JPEG, RGB
    image/format                        bytes   b"png" | b"jpeg"
    image/height, image/width           int64
    image/filename                      bytes   source id (e.g. "aachen_000000_000019")
    image/segmentation/class/encoded    bytes   single-channel 8-bit PNG of train ids, 255 = void
    image/segmentation/class/format     bytes   b"png"

A converted split lives in one directory as shards `{split}-{i:05d}-of-{n:05d}[.g<k>].tfrecord` plus a
manifest `{split}.json` (label space with names and colours, count, sizes, source, converter
version, shard names, shard order); see `data_tools` and `crn-convert`. The pipeline takes its
label space from the manifest; label ids outside it (other than 255) fail with the example named.

Training order: epoch e reads the shards in a permutation seeded by (seed, e), interleaved record by
record, through a shuffle buffer seeded by (seed, e); the converters already wrote the pairs in a
seeded random order across shards. With a seed the stream is exact (deterministic at every stage)
and `position=` restarts it after any number of examples without saving buffers.

Element structure of `make_dataset` (B = global batch size, H x W = training size, C = classes):

    {
        "layout":    float32 [B, H, W, C + 1]  one-hot, void channel last (crn_tf.labels.one_hot)
        "image":     float32 [B, H, W, 3]      RGB in [0, 255]
        "label_ids": uint8   [B, H, W]         train ids, 255 = void
        "filename":  string  [B]
    }

Typical use:

    ds = make_dataset("/data/cityscapes_tfr", "train", batch_size=8, config=get_preset("cityscapes_256p"))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from crn_tf import labels
from crn_tf.fileio import read_json
from crn_tf.png import encode_png  # noqa: F401 - data.encode_png: the converters' name for it

MANIFEST_VERSION = 1

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_FILENAME = "image/filename"
LABEL_ENCODED = "image/segmentation/class/encoded"
LABEL_FORMAT = "image/segmentation/class/format"

_FEATURES = {
    IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="png"),
    IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LABEL_ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="png"),
}


def shard_name(split: str, index: int, num_shards: int, generation: int = 0) -> str:
    """`{split}-{i:05d}-of-{n:05d}.tfrecord`, or `...-of-{n:05d}.g{generation}.tfrecord` for generation > 0
    (a re-conversion writes names the current manifest does not list, so the old split stays whole)."""
    suffix = f".g{generation}" if generation else ""
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}.tfrecord"


def manifest_path(data_dir: str, split: str) -> str:
    """`{data_dir}/{split}.json` (works for local and gs:// paths)."""
    return f"{data_dir.rstrip('/')}/{split}.json"


# ----------------------------------------------------------------------------------------- encode


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def encode_example(
    image_bytes: bytes,
    image_format: str,
    label_png: bytes,
    height: int,
    width: int,
    filename: str,
) -> tf.train.Example:
    """Builds the schema's `tf.train.Example` from already-encoded bytes.

    Args:
        image_bytes: PNG or JPEG bytes of the RGB photo.
        image_format: "png" or "jpeg".
        label_png: single-channel 8-bit PNG of train ids (255 = void), same size as the photo.
        height, width: photo size in pixels.
        filename: source id, kept for logs and image summaries.
    """
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                IMAGE_ENCODED: _bytes(image_bytes),
                IMAGE_FORMAT: _bytes(image_format.encode()),
                IMAGE_HEIGHT: _int(height),
                IMAGE_WIDTH: _int(width),
                IMAGE_FILENAME: _bytes(filename.encode()),
                LABEL_ENCODED: _bytes(label_png),
                LABEL_FORMAT: _bytes(b"png"),
            }
        )
    )


def encode_pair(image: np.ndarray, label_ids: np.ndarray, filename: str) -> tf.train.Example:
    """uint8 photo [H, W, 3] + uint8 train ids [H, W] -> `tf.train.Example` (both stored as PNG)."""
    image, label_ids = np.asarray(image), np.asarray(label_ids)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{filename}: photo must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label_ids.shape != image.shape[:2] or label_ids.dtype != np.uint8:
        raise ValueError(
            f"{filename}: label ids must be uint8 {image.shape[:2]} like the photo, got {label_ids.dtype} "
            f"{label_ids.shape}"
        )
    h, w = label_ids.shape
    return encode_example(encode_png(image, fast=True), "png", encode_png(label_ids, fast=True), h, w, filename)


# ------------------------------------------------------------------------------------------ parse


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Serialized `tf.train.Example` -> {"image": uint8 [H, W, 3], "label_ids": uint8 [H, W], "filename": string}.

    Works eagerly and inside Dataset.map. Fails with InvalidArgument naming the file when photo and
    label sizes differ.
    """
    f = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.io.decode_image(f[IMAGE_ENCODED], channels=3, dtype=tf.uint8, expand_animations=False)  # [H, W, 3]
    label = tf.io.decode_png(f[LABEL_ENCODED], channels=1, dtype=tf.uint8)  # [H, W, 1]
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)[:2]))
    tf.debugging.Assert(
        same_size, ["photo and label sizes differ in example", f[IMAGE_FILENAME], tf.shape(image), tf.shape(label)]
    )
    image.set_shape([None, None, 3])
    return {"image": image, "label_ids": label[..., 0], "filename": f[IMAGE_FILENAME]}


# ------------------------------------------------------------------------------------- transforms


def resize_pair(example: dict[str, tf.Tensor], size: Sequence[int]) -> dict[str, tf.Tensor]:
    """Resizes to `size` = (H, W): area for the photo (-> float32 [H, W, 3] in [0, 255]), nearest for ids.

    Ids are never interpolated: nearest keeps every label a real class (or void).
    """
    h, w = int(size[0]), int(size[1])
    image = tf.image.resize(tf.cast(example["image"], tf.float32), [h, w], method="area")  # [H, W, 3] float32
    label = tf.image.resize(example["label_ids"][..., None], [h, w], method="nearest")[..., 0]  # [H, W] uint8
    image.set_shape([h, w, 3])
    label.set_shape([h, w])
    return {**example, "image": image, "label_ids": tf.cast(label, tf.uint8)}


def flip_pair(example: dict[str, tf.Tensor], flip: tf.Tensor | bool) -> dict[str, tf.Tensor]:
    """Mirrors photo and label left-right together when `flip` (a scalar bool) is true."""
    flip = tf.convert_to_tensor(flip, tf.bool)
    image = tf.cond(flip, lambda: tf.reverse(example["image"], axis=[1]), lambda: example["image"])
    label = tf.cond(flip, lambda: tf.reverse(example["label_ids"], axis=[1]), lambda: example["label_ids"])
    return {**example, "image": image, "label_ids": label}


def random_flip(example: dict[str, tf.Tensor], seed: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """flip_pair with probability 1/2; `seed` is an optional stateless seed int32/int64 [2]."""
    if seed is None:
        coin = tf.random.uniform([]) < 0.5
    else:
        coin = tf.random.stateless_uniform([], seed=seed) < 0.5
    return flip_pair(example, coin)


def add_layout(example: dict[str, tf.Tensor], num_classes: int) -> dict[str, tf.Tensor]:
    """Adds "layout": float32 [H, W, num_classes + 1], one-hot of label_ids with void last."""
    return {**example, "layout": labels.one_hot(example["label_ids"], num_classes)}


# --------------------------------------------------------------------------------------- manifest


def load_manifest(data_dir: str, split: str) -> dict:
    """Reads and checks `{data_dir}/{split}.json`; raises ValueError naming the file if unusable."""
    path = manifest_path(data_dir, split)
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"{path}: no manifest for split {split!r}. Convert the data with crn-convert, or read DeepLab-style "
            "TFRecords without a manifest with make_dataset(file_pattern=..., label_space=...)"
        )
    manifest = read_json(path)
    for key in ("label_space", "count", "shards"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest lacks {key!r}; re-run crn-convert")
    if manifest.get("manifest_version", 0) > MANIFEST_VERSION:
        raise ValueError(
            f"{path}: manifest version {manifest['manifest_version']} is newer than this crn_tf understands "
            f"({MANIFEST_VERSION})"
        )
    return manifest


def manifest_label_space(manifest: dict, source: str = "<manifest>") -> labels.LabelSpace:
    """The label space a manifest records; a missing or malformed one raises ValueError naming `source`."""
    if "label_space" not in manifest:
        raise ValueError(f"{source}: manifest lacks 'label_space'; re-run crn-convert")
    space = labels.LabelSpace.from_dict(manifest["label_space"], source=f"{source} (its 'label_space')")
    count = manifest.get("num_classes")
    if count is not None and count != space.num_classes:
        raise ValueError(
            f"{source}: 'num_classes' is {count} but its 'label_space' lists {space.num_classes} classes; "
            "re-run crn-convert"
        )
    return space


# --------------------------------------------------------------------------------------- pipeline


_FOREVER = 2**62


def _count_records(files: Sequence[str]) -> int:
    return int(tf.data.TFRecordDataset(list(files)).reduce(np.int64(0), lambda n, _: n + 1))


def _training_records(
    files: Sequence[str], count: int, seed: int, shuffle_buffer: int, position: int, deterministic: bool
) -> tf.data.Dataset:
    """(serialized record, stream index) pairs of the endless training stream, from `position` on.

    Epoch e reads the shards in a permuted order (stateless, seeded by (seed, e)), interleaves up to 16
    of them record by record and shuffles through a buffer seeded by (seed, e). The stream is a pure
    function of the seed, so a resumed run rebuilds it and skips to its position: whole epochs
    arithmetically, then at most one epoch of undecoded records. Nothing but the position needs saving.
    """
    files_t = tf.constant(list(files))
    num_files = len(files)
    start_epoch, offset = divmod(int(position), int(count))
    seed = int(seed) % 2**31

    def epoch_records(epoch):
        # Seeds here must not depend on the global seed (Keras sets one when a Trainer starts):
        # with no graph-level seed, an op seed alone fixes the shuffle.
        tf.compat.v1.get_default_graph().seed = None
        order = tf.argsort(
            tf.random.stateless_uniform([num_files], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        )
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(num_files, 16),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
        ds = ds.shuffle(
            shuffle_buffer, seed=tf.constant(seed, tf.int64) * 1_000_003 + epoch, reshuffle_each_iteration=False
        )
        return ds.skip(tf.where(epoch == start_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64)))

    epochs = tf.data.Dataset.range(start_epoch, _FOREVER)
    records = epochs.flat_map(epoch_records)
    return tf.data.Dataset.zip((records, tf.data.Dataset.range(int(position), _FOREVER)))


def _check_ids(example: dict, num_classes: int, space_name: str, source: str) -> None:
    """InvalidArgument naming the example when its label ids leave the label space (other than void)."""
    ids = example["label_ids"]
    bad = tf.logical_and(ids >= num_classes, ids != labels.VOID_ID)
    tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [
            f"{source}: example",
            example["filename"],
            f"has class ids beyond label space {space_name!r} ({num_classes} classes: ids 0..{num_classes - 1}, "
            f"{labels.VOID_ID} = void); largest id",
            tf.reduce_max(tf.where(bad, ids, tf.zeros_like(ids))),
        ],
    )


def make_dataset(
    data_dir: str | None = None,
    split: str = "train",
    *,
    batch_size: int,
    image_size: Sequence[int] | None = None,
    config=None,
    training: bool = True,
    flip: bool | None = None,
    shuffle_buffer: int = 256,
    file_pattern: str | None = None,
    label_space: labels.LabelSpace | str | None = None,
    seed: int | None = None,
    position: int = 0,
) -> tf.data.Dataset:
    """The training/evaluation input pipeline (element structure in the module docstring).

    Args:
        data_dir: directory of a converted split (shards + `{split}.json`).
        split: split name, e.g. "train" or "val".
        batch_size: the *global* batch size (a distribution strategy splits it over replicas).
        image_size: (H, W) to resize to; default: the config's native size, else the manifest's
            size when all examples share one.
        config: a CRNConfig; its num_classes must match the data's label space.
        training: shuffle, repeat forever (a new order each epoch), drop the last partial batch.
        flip: random horizontal flip of photo and label together; default = training.
        shuffle_buffer: examples in the shuffle buffer (training only).
        file_pattern: glob of DeepLab-style TFRecords to read instead of a manifest's shards.
        label_space: required with file_pattern (there is no manifest to take it from); a
            LabelSpace or a name/palette-JSON path for crn_tf.labels.get_label_space.
        seed: with a seed, the training stream (shard order, shuffling, flips) is a function of the seed
            alone and every stage is deterministic: the same batches in the same order, every time.
            Without one, a random seed and tf.data may reorder elements for speed.
        position: examples of the training stream already consumed (a resumed run's position): the
            stream starts there, as if that many examples had been read. Exact with a seed.

    Returns:
        A tf.data.Dataset of dicts: layout, image, label_ids, filename (batched).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flip = training if flip is None else flip
    if file_pattern is not None:
        if label_space is None:
            raise ValueError(f"file_pattern={file_pattern!r} has no manifest: pass label_space= (e.g. 'cityscapes')")
        space = label_space if isinstance(label_space, labels.LabelSpace) else labels.get_label_space(label_space)
        files = sorted(tf.io.gfile.glob(file_pattern))
        if not files:
            raise ValueError(f"file_pattern={file_pattern!r} matches no files")
        sizes = sizes_count = None
        source = file_pattern
    else:
        if data_dir is None:
            raise ValueError("make_dataset needs data_dir (with a manifest) or file_pattern + label_space")
        manifest = load_manifest(data_dir, split)
        source = manifest_path(data_dir, split)
        space = manifest_label_space(manifest, source)
        if label_space is not None:
            given = label_space if isinstance(label_space, labels.LabelSpace) else labels.get_label_space(label_space)
            if given.num_classes != space.num_classes:
                raise ValueError(
                    f"label_space {given.name!r} has {given.num_classes} classes but {source} says "
                    f"{space.name!r} with {space.num_classes}"
                )
        files = [f"{data_dir.rstrip('/')}/{name}" for name in manifest["shards"]]
        missing = [f for f in files if not tf.io.gfile.exists(f)]
        if missing:
            raise ValueError(f"{source} lists shards that do not exist: {missing[:3]}; re-run crn-convert")
        if manifest["count"] == 0:
            raise ValueError(f"{source}: the split has no examples")
        sizes, sizes_count = manifest.get("sizes"), int(manifest["count"])
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    if config is not None and config.num_classes != space.num_classes:
        raise ValueError(
            f"config {config.name!r} expects {config.num_classes} classes (label space {config.label_space!r}) but "
            f"the data in {source} uses label space {space.name!r} with {space.num_classes} classes"
        )
    if config is not None and config.classes is not None and config.get_label_space().class_names != space.class_names:
        raise ValueError(
            f"config {config.name!r} was made for label space {config.label_space!r}, whose classes differ from "
            f"those of {space.name!r} in {source}; train a model for this data (crn-train takes the classes from it)"
        )
    if image_size is None:
        if config is not None:
            image_size = config.native_size
        elif sizes and len(sizes) == 1:
            image_size = [int(v) for v in next(iter(sizes)).split("x")]
        else:
            raise ValueError(f"{source}: examples have several sizes {sizes}; pass image_size=(H, W) or config=")
    h, w = int(image_size[0]), int(image_size[1])
    num_classes = space.num_classes

    if training:
        if seed is None:
            # Unseeded: a fresh seed, and tf.data may reorder elements for speed.
            seed, deterministic = int(np.random.SeedSequence().generate_state(1)[0]), False
        else:
            deterministic = True
        # Only a resumed stream needs the epoch size (a manifest has it; DeepLab-style records are counted).
        count = sizes_count if sizes_count is not None else (_count_records(files) if position else 1)
        ds = _training_records(files, count, seed, shuffle_buffer, position, deterministic)
    else:
        deterministic = True
        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(0, _FOREVER)))

    def transform(serialized, index):
        example = resize_pair(parse_example(serialized), (h, w))
        _check_ids(example, num_classes, space.name, source)
        if flip:
            # Stateless per element: a seeded stream flips the same examples after a resume.
            example = random_flip(example, tf.stack([tf.cast(seed or 0, tf.int64), index]))
        return add_layout(example, num_classes)

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.map(lambda e: {k: e[k] for k in ("layout", "image", "label_ids", "filename")})
    ds = ds.batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = deterministic
    # The source is computed per epoch (no file list to split by): each worker of a multi-worker run
    # reads the stream and keeps its share of the batches.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)
