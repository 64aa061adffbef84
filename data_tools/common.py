"""What every converter shares: reading and checking images, the sharded TFRecord writer, the manifest.

A converter only lists its pairs (a `PairSource`: items + a `load` function); `convert` does the
rest: parallel decode/check/resize/encode, shards written under temporary names and renamed
when all are complete, then the manifest `{split}.json`. Problems with single input files raise
`ConversionError` (the message names the file and what was expected); with `skip_bad=True`
they are listed in the manifest's "skipped" instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from crn_tf import data, labels
from crn_tf.fileio import temporary_name, write_json

# Bumped when the bytes a converter writes for the same input change.
CONVERTER_VERSION = "1"

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ConversionError(ValueError):
    """A problem with one input file (or pair); `str()` names the file and what was expected."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class Item:
    """One pair to convert: `name` becomes image/filename; photo/label are paths or dataset indices."""

    name: str
    photo: str | int
    label: str | int


@dataclasses.dataclass
class LoadedPair:
    """A decoded pair. photo: uint8 [H, W, 3]; label_ids: uint8 [H, W] train ids (255 = void)."""

    photo: np.ndarray
    label_ids: np.ndarray
    photo_bytes: bytes | None = None  # the original RGB PNG/JPEG, stored as is when not resized
    photo_format: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PairSource:
    """The pairs of one dataset split, as listed by a converter.

    Attributes:
        dataset: converter name for the manifest ("cityscapes", "gta", ...).
        label_space: the train-id space of the labels `load` returns.
        items: the pairs, in a stable order.
        load: decodes one item; raises ConversionError for bad files.
        info: extra manifest "source" fields (input path, label route, ...).
        problems: pairing problems found while listing (photo without label, ...).
    """

    dataset: str
    label_space: labels.LabelSpace
    items: list[Item]
    load: Callable[[Item], LoadedPair]
    info: dict = dataclasses.field(default_factory=dict)
    problems: list[ConversionError] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------- image reading


def read_bytes(path: str) -> bytes:
    if not tf.io.gfile.exists(path):
        raise ConversionError(path, "file not found")
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _open(data_bytes: bytes, path: str, what: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data_bytes))
        image.load()  # decodes everything: truncated files fail here
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ConversionError(path, f"unreadable or truncated {what} ({e}); expected a PNG or JPEG file") from None
    return image


def _png_bit_depth(data_bytes: bytes) -> int | None:
    # PNG: 8-byte signature, IHDR length + type, width, height, then the bit depth byte.
    if data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 24:
        return data_bytes[24]
    return None


def decode_photo(data_bytes: bytes, path: str) -> LoadedPair:
    """Photo bytes -> LoadedPair with photo uint8 [H, W, 3] (label_ids left empty).

    Policy: 8-bit grayscale, palette, RGBA/LA and CMYK photos are *converted* to RGB, with a note
    that ends up in the manifest (alpha is dropped, gray is replicated). 16-bit and float photos
    are refused: the pipeline works on 8-bit RGB.
    """
    image = _open(data_bytes, path, "photo")
    if image.format not in ("PNG", "JPEG"):
        raise ConversionError(path, f"{image.format} photo; expected PNG or JPEG")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") or _png_bit_depth(data_bytes) == 16:
        raise ConversionError(path, f"16-bit or float photo (mode {image.mode}); expected 8-bit RGB")
    if image.mode == "RGB":
        return LoadedPair(np.asarray(image), np.zeros((0, 0), np.uint8), data_bytes, image.format.lower())
    note = f"photo mode {image.mode} converted to RGB" + (" (alpha dropped)" if "A" in image.mode else "")
    return LoadedPair(np.asarray(image.convert("RGB")), np.zeros((0, 0), np.uint8), notes=[note])


def _check_label_depth(image, data_bytes: bytes, path: str) -> None:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") or _png_bit_depth(data_bytes) == 16:
        raise ConversionError(path, f"16-bit label PNG (mode {image.mode}); expected an 8-bit PNG")


def decode_label_ids(data_bytes: bytes, path: str) -> np.ndarray:
    """Single-channel 8-bit id PNG (mode L, or P whose indices are ids) -> uint8 [H, W] (values as stored)."""
    image = _open(data_bytes, path, "label")
    _check_label_depth(image, data_bytes, path)
    if image.mode not in ("L", "P"):
        raise ConversionError(
            path, f"label image has mode {image.mode}; expected single-channel 8-bit ids (for colour labels use "
            "the colour route with a palette)"
        )  # fmt: skip
    return np.asarray(image, np.uint8)


def decode_label_colors(data_bytes: bytes, path: str, space: labels.LabelSpace) -> np.ndarray:
    """RGB / RGBA (alpha ignored) / palette colour label -> train ids uint8 [H, W]; unknown colours -> void."""
    image = _open(data_bytes, path, "label")
    _check_label_depth(image, data_bytes, path)
    if image.mode not in ("RGB", "RGBA", "P"):
        raise ConversionError(
            path, f"label image has mode {image.mode}; expected a colour layout (RGB, RGBA or palette) in the "
            f"{space.name} palette"
        )  # fmt: skip
    return labels.colors_to_ids(np.asarray(image.convert("RGB")), space)


def match_by_stem(photos: Iterable[str], label_files: Iterable[str], photo_dir: str, label_dir: str):
    """Pairs files by stem. Returns (sorted [(stem, photo, label)], [ConversionError for unmatched files])."""

    def by_stem(paths, folder):
        found, problems = {}, []
        for p in paths:
            stem = p.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if stem in found:
                problems.append(ConversionError(p, f"two files with stem {stem!r} in {folder} ({found[stem]})"))
            else:
                found[stem] = p
        return found, problems

    photo_map, problems = by_stem(photos, photo_dir)
    label_map, more = by_stem(label_files, label_dir)
    problems += more
    for stem in sorted(set(photo_map) - set(label_map)):
        problems.append(ConversionError(photo_map[stem], f"photo without label: no {stem}.* in {label_dir}"))
    for stem in sorted(set(label_map) - set(photo_map)):
        problems.append(ConversionError(label_map[stem], f"label without photo: no {stem}.* in {photo_dir}"))
    pairs = [(s, photo_map[s], label_map[s]) for s in sorted(set(photo_map) & set(label_map))]
    return pairs, problems


def list_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Files directly in `folder` whose name ends with one of `extensions` (case-insensitive)."""
    if not tf.io.gfile.isdir(folder):
        raise ConversionError(folder, "folder not found")
    names = tf.io.gfile.listdir(folder)
    return sorted(f"{folder.rstrip('/')}/{n}" for n in names if n.lower().endswith(extensions))


# ------------------------------------------------------------------------------------------ writing


def _prepare(source: PairSource, item: Item, resize: tuple[int, int] | None) -> tuple[bytes, tuple[int, int], list]:
    """Loads, checks, resizes and encodes one pair -> (serialized Example, (H, W), notes)."""
    from PIL import Image

    pair = source.load(item)
    photo, ids = pair.photo, pair.label_ids  # [H, W, 3], [H, W]
    label_path = item.label if isinstance(item.label, str) else f"{item.name} (label)"
    if photo.shape[:2] != ids.shape:
        raise ConversionError(
            label_path, f"label is {ids.shape[0]}x{ids.shape[1]} but its photo {item.photo} is "
            f"{photo.shape[0]}x{photo.shape[1]}; expected the same size"
        )  # fmt: skip
    ids = np.where(ids < source.label_space.num_classes, ids, labels.VOID_ID).astype(np.uint8)
    if resize is not None and resize != photo.shape[:2]:
        h, w = resize
        # Area-like averaging for the photo (BOX), nearest for ids: never invent a class.
        photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.BOX))
        ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))
        photo_bytes, fmt = data.encode_png(photo), "png"
    elif pair.photo_bytes is not None:
        photo_bytes, fmt = pair.photo_bytes, pair.photo_format
    else:
        photo_bytes, fmt = data.encode_png(photo), "png"
    h, w = ids.shape
    example = data.encode_example(photo_bytes, fmt, data.encode_png(ids), h, w, item.name)
    return example.SerializeToString(), (h, w), pair.notes


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator[tuple[Item, concurrent.futures.Future]]:
    """Runs fn over items on a thread pool (Pillow/zlib release the GIL), yielding in input order."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        window = collections.deque()
        it = iter(items)
        for item in it:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 4 * max(1, workers):
                yield window.popleft()
        while window:
            yield window.popleft()
    finally:
        # Ctrl-C or an error: drop queued work instead of finishing it.
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """A one-line console progress bar with images/s (to stderr)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled, self.stream = total, enabled, stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.2 or done == self.total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            filled = int(30 * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}  {rate:.1f} images/s")
            self.stream.flush()

    def close(self) -> float:
        """Ends the line; returns images/s."""
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            self.stream.write("\n")
        return self.done / max(elapsed, 1e-9)


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        if tf.io.gfile.exists(p):
            tf.io.gfile.remove(p)


def convert(
    source: PairSource,
    output_dir: str,
    split: str,
    *,
    num_shards: int = 4,
    resize: tuple[int, int] | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> dict:
    """Writes `source` as `{split}-*-of-*.tfrecord` shards + `{split}.json` under output_dir.

    All or nothing: shards are written to temporary names and renamed only when every shard is
    complete; an error or KeyboardInterrupt removes them, and the old manifest is removed first so a
    half-replaced split is never readable. Re-running the same command redoes the job.

    Args:
        source: the pairs, from a converter's make_source.
        output_dir: destination folder (created; any tf.io.gfile path).
        split: split name used in file names.
        num_shards: number of shards (at most one per pair).
        resize: (H, W) to resize to (area for photos, nearest for labels), or None for full size.
        workers: threads decoding/encoding in parallel.
        skip_bad: list file problems in the manifest's "skipped" instead of stopping.
        progress: print a progress bar with images/s to stderr.

    Returns:
        The manifest dict (also written to `{output_dir}/{split}.json`), plus "images_per_second".
    """
    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    skipped = []
    for problem in source.problems:
        if not skip_bad:
            raise problem
        skipped.append({"file": problem.path, "error": problem.problem})
    items = source.items
    if not items:
        raise ConversionError(source.info.get("input", "<input>"), "no usable pairs found")
    tf.io.gfile.makedirs(output_dir)
    out = output_dir.rstrip("/")
    manifest_file = data.manifest_path(out, split)
    _remove([manifest_file])
    # Leftovers of a killed run (SIGKILL leaves temporary files behind).
    _remove(tf.io.gfile.glob(f"{out}/{split}-*-of-*.tfrecord.tmp-*"))

    n = min(num_shards, len(items))
    names = [data.shard_name(split, i, n) for i in range(n)]
    temps = [temporary_name(f"{out}/{name}") for name in names]
    bounds = [len(items) * i // n for i in range(n + 1)]  # shard i holds items[bounds[i]:bounds[i+1]]
    sizes: collections.Counter = collections.Counter()
    notes = []
    bar = Progress(len(items), progress)
    writer = None
    results = _ordered_map(lambda it: _prepare(source, it, resize), items, workers)
    try:
        for index, (item, future) in enumerate(results):
            shard = next(i for i in range(n) if bounds[i] <= index < bounds[i + 1])
            if writer is None or index == bounds[shard]:
                if writer is not None:
                    writer.close()
                writer = tf.io.TFRecordWriter(temps[shard])
            try:
                record, size, item_notes = future.result()
            except ConversionError as e:
                if not skip_bad:
                    raise
                skipped.append({"file": e.path, "error": e.problem})
            else:
                writer.write(record)
                sizes[f"{size[0]}x{size[1]}"] += 1
                notes += [{"file": item.name, "note": note} for note in item_notes]
            bar.update(index + 1)
        writer.close()
        writer = None
        rate = bar.close()
        count = sum(sizes.values())
        if count == 0:
            raise ConversionError(source.info.get("input", "<input>"), "every pair was bad; nothing to write")
        for tmp, name in zip(temps, names):
            tf.io.gfile.rename(tmp, f"{out}/{name}", overwrite=True)
    except BaseException:
        results.close()  # cancels queued work
        if writer is not None:
            writer.close()
        _remove(temps)
        raise
    manifest = {
        "manifest_version": data.MANIFEST_VERSION,
        "converter_version": CONVERTER_VERSION,
        "split": split,
        "label_space": json.loads(source.label_space.to_json()),
        "num_classes": source.label_space.num_classes,
        "count": count,
        "sizes": dict(sorted(sizes.items())),
        "resize": None if resize is None else f"{resize[0]}x{resize[1]}",
        "shards": names,
        "source": {"dataset": source.dataset, **source.info},
        "skipped": skipped,
        "notes": notes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(manifest_file, manifest)
    # Shards of an earlier run with another --num_shards would otherwise linger beside the new ones.
    _remove(p for p in tf.io.gfile.glob(f"{out}/{split}-*-of-*.tfrecord") if p.rsplit("/", 1)[-1] not in names)
    return {**manifest, "images_per_second": rate}
