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
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from crn_tf import data, labels
from crn_tf.fileio import read_json, temporary_name, write_json
from crn_tf.lock import DirLock
from crn_tf.progress import Progress

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


def map_label_values(values: np.ndarray, table: np.ndarray, path: str, expected: str) -> np.ndarray:
    """Maps stored label values through `table` (int16 [256]: train id, 255 = void, -1 = not allowed)."""
    mapped = table[values]
    if (mapped < 0).any():
        bad = sorted(int(v) for v in np.unique(values[mapped < 0]))
        raise ConversionError(path, f"label values {bad[:8]} are not in the dataset's classes; expected {expected}")
    return mapped.astype(np.uint8)


def id_map_source(
    name: str,
    space: labels.LabelSpace,
    photo_dir: str,
    label_dir: str,
    table: np.ndarray,
    expected: str,
    info: dict,
    missing: str,
) -> PairSource:
    """Photos in `photo_dir` paired by stem with 8-bit id PNGs in `label_dir` whose values `table` maps to
    train ids (map_label_values; `expected` describes the allowed values). `missing` says which layout
    was expected when both folders are empty."""
    pairs, problems = paired_files(
        photo_dir, label_dir, ConversionError(photo_dir, f"no photos or label maps found; expected {missing}")
    )

    def load(item: Item) -> LoadedPair:
        pair = decode_photo(read_bytes(item.photo), item.photo)
        values = decode_label_ids(read_bytes(item.label), item.label)
        pair.label_ids = map_label_values(values, table, item.label, expected)
        return pair

    return PairSource(name, space, [Item(s, p, lab) for s, p, lab in pairs], load, info, problems)


def paired_files(photo_dir: str, label_dir: str, empty: ConversionError):
    """PNG/JPEG photos in `photo_dir` and PNG labels in `label_dir`, paired by stem (match_by_stem);
    raises `empty` when both folders hold none."""
    photos = list_files(photo_dir, PHOTO_EXTENSIONS)
    label_files = list_files(label_dir, (".png",))
    if not photos and not label_files:
        raise empty
    return match_by_stem(photos, label_files, photo_dir, label_dir)


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
    space = source.label_space
    beyond = (ids >= space.num_classes) & (ids != labels.VOID_ID)
    if beyond.any():
        raise ConversionError(
            label_path, f"class ids {sorted(int(v) for v in np.unique(ids[beyond]))[:8]} are beyond label space "
            f"{space.name!r} ({space.num_classes} classes: ids 0..{space.num_classes - 1}, {labels.VOID_ID} = void)"
        )  # fmt: skip
    if resize is not None and resize != photo.shape[:2]:
        h, w = resize
        # Area-like averaging for the photo (BOX), nearest for ids: never invent a class.
        photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.BOX))
        ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))
        photo_bytes, fmt = data.encode_png(photo, fast=True), "png"
    elif pair.photo_bytes is not None:
        photo_bytes, fmt = pair.photo_bytes, pair.photo_format
    else:
        photo_bytes, fmt = data.encode_png(photo, fast=True), "png"
    h, w = ids.shape
    example = data.encode_example(photo_bytes, fmt, data.encode_png(ids, fast=True), h, w, item.name)
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


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        if tf.io.gfile.exists(p):
            tf.io.gfile.remove(p)


# Shards of a few hundred MB (large sequential reads), and at least this many for parallel reads
# (one per 8 pairs for small sets, so a handful of pairs is not spread over 16 files).
TARGET_SHARD_BYTES = 256 * 2**20
MIN_SHARDS = 16
_SIZE_SAMPLE = 32  # records encoded before the shard count is chosen from their mean size


def default_num_shards(num_items: int, mean_record_bytes: float) -> int:
    """Shards for `num_items` records of about `mean_record_bytes` each (see TARGET_SHARD_BYTES)."""
    by_size = math.ceil(num_items * mean_record_bytes / TARGET_SHARD_BYTES)
    return max(1, min(num_items, max(by_size, min(MIN_SHARDS, math.ceil(num_items / 8)))))


def _shard_files(out: str, split: str) -> list[str]:
    """This split's shard and temporary files in `out` (listed, not globbed: paths may hold `[ ] * ?`)."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{5}}-of-\d{{5}}(\.g\d+)?\.tfrecord(\.tmp-.*)?$")
    if not tf.io.gfile.isdir(out):
        return []
    return sorted(f"{out}/{n}" for n in tf.io.gfile.listdir(out) if pattern.match(n))


class ConversionLock(DirLock):
    """`{output_dir}/.{split}.lock`: one crn-convert per split and folder at a time (crn_tf.lock.DirLock:
    the file names the holder; a lock left by a process of this host that no longer runs is taken over,
    any other is refused with a ConversionError naming it; on gs:// the check is best effort)."""

    user = "crn-convert"

    def __init__(self, out: str, split: str):
        super().__init__(out, f".{split}.lock")

    def busy_error(self, holder: dict) -> Exception:
        return ConversionError(
            self.path, f"another crn-convert (host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}) is writing this split; wait for it, or delete the lock file if that "
            "process is gone"
        )  # fmt: skip

    def unreadable_error(self) -> Exception:
        return ConversionError(self.path, "an unreadable lock file (not JSON); delete it if no crn-convert is running")


def _old_shards(manifest_file: str) -> set[str]:
    """Shard names the current manifest lists (none if there is no readable manifest)."""
    try:
        return set(read_json(manifest_file).get("shards", []))
    except (ValueError, AttributeError):
        return set()


def convert(
    source: PairSource,
    output_dir: str,
    split: str,
    *,
    num_shards: int | None = None,
    resize: tuple[int, int] | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
    seed: int = 0,
) -> dict:
    """Writes `source` as `{split}-*-of-*.tfrecord` shards + `{split}.json` under output_dir.

    The pairs are written in a seeded random order (a dataset listed city by city is mixed across
    shards). All or nothing: new shards get names the current manifest does not list and are
    written under temporary names; the manifest is replaced (atomically) only when every shard is
    complete, and only then are the old shards removed. Until that moment the previous dataset stays
    complete and readable; an error, Ctrl-C or kill leaves it as it was. Two converts into one split
    of one folder are refused (ConversionLock). Re-running the same command redoes the job.

    Args:
        source: the pairs, from a converter's make_source.
        output_dir: destination folder (created; any tf.io.gfile path).
        split: split name used in file names.
        num_shards: number of shards (at most one per pair); None = default_num_shards.
        resize: (H, W) to resize to (area for photos, nearest for labels), or None for full size.
        workers: threads decoding/encoding in parallel.
        skip_bad: list file problems in the manifest's "skipped" instead of stopping.
        progress: print a progress bar with images/s to stderr.
        seed: seeds the order of the pairs across shards.

    Returns:
        The manifest dict (also written to `{output_dir}/{split}.json`), plus "images_per_second".
    """
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1 (or 0 for the default), got {num_shards}")
    skipped = []
    for problem in source.problems:
        if not skip_bad:
            raise problem
        skipped.append({"file": problem.path, "error": problem.problem})
    if not source.items:
        raise ConversionError(source.info.get("input", "<input>"), "no usable pairs found")
    order = np.random.default_rng(seed).permutation(len(source.items))
    items = [source.items[i] for i in order]
    tf.io.gfile.makedirs(output_dir)
    out = output_dir.rstrip("/")
    manifest_file = data.manifest_path(out, split)
    with ConversionLock(out, split):
        # Leftovers of a killed run (SIGKILL leaves temporary files behind); no other run is writing.
        _remove(p for p in _shard_files(out, split) if ".tfrecord.tmp-" in p)
        old = _old_shards(manifest_file)
        results = _ordered_map(lambda it: _prepare(source, it, resize), items, workers)
        bar = Progress(len(items), enabled=progress, stream=sys.stderr)
        temps: list[str] = []
        names: list[str] = []
        try:
            outcomes = _outcomes(results)
            sample = list(itertools.islice(outcomes, _SIZE_SAMPLE))
            if num_shards is None:
                encoded = [len(o[0]) for _, o in sample if not isinstance(o, ConversionError)]
                num_shards = default_num_shards(len(items), float(np.mean(encoded)) if encoded else 0.0)
            n = min(num_shards, len(items))
            generation = next(
                g for g in itertools.count() if not {data.shard_name(split, i, n, g) for i in range(n)} & old
            )
            names = [data.shard_name(split, i, n, generation) for i in range(n)]
            temps = [temporary_name(f"{out}/{name}") for name in names]
            sizes, notes, count = _write_shards(
                itertools.chain(sample, outcomes), temps, len(items), skip_bad, skipped, bar
            )
            rate = bar.close()
            if count == 0:
                raise ConversionError(source.info.get("input", "<input>"), "every pair was bad; nothing to write")
            for tmp, name in zip(temps, names):
                tf.io.gfile.rename(tmp, f"{out}/{name}", overwrite=True)
            manifest = {
                "manifest_version": data.MANIFEST_VERSION,
                "converter_version": CONVERTER_VERSION,
                "split": split,
                "label_space": source.label_space.to_dict(),
                "num_classes": source.label_space.num_classes,
                "count": count,
                "sizes": dict(sorted(sizes.items())),
                "resize": None if resize is None else f"{resize[0]}x{resize[1]}",
                "shards": names,
                "order": {"shuffled": True, "seed": seed},
                "source": {"dataset": source.dataset, **source.info},
                "skipped": skipped,
                "notes": notes,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            write_json(manifest_file, manifest)  # the switch: readers see the old or the new split, whole
        except BaseException:
            results.close()  # cancels queued work
            _remove(temps)
            # Renamed new shards whose manifest was never written (the current manifest does not list them).
            _remove(f"{out}/{name}" for name in names if name not in _old_shards(manifest_file))
            raise
        # The old split's shards (and those of any earlier --num_shards) are no longer listed.
        _remove(p for p in _shard_files(out, split) if p.rsplit("/", 1)[-1] not in names)
    return {**manifest, "images_per_second": rate}


def _outcomes(results) -> Iterator[tuple[Item, tuple | ConversionError]]:
    """(item, (record, size, notes)) or (item, ConversionError) in input order; other errors raise."""
    for item, future in results:
        try:
            yield item, future.result()
        except ConversionError as e:
            yield item, e


def _write_shards(outcomes, temps: list[str], total: int, skip_bad: bool, skipped: list, bar: Progress):
    """Writes the records into `temps` (shard i holds the i-th n-th of the items); returns (sizes, notes, count)."""
    n = len(temps)
    bounds = [total * i // n for i in range(n + 1)]  # shard i holds items[bounds[i]:bounds[i+1]]
    sizes: collections.Counter = collections.Counter()
    notes = []
    writer = None
    shard = -1
    try:
        for index, (item, outcome) in enumerate(outcomes):
            while index >= bounds[shard + 1]:
                if writer is not None:
                    writer.close()
                shard += 1
                writer = tf.io.TFRecordWriter(temps[shard])
            if isinstance(outcome, ConversionError):
                if not skip_bad:
                    raise outcome
                skipped.append({"file": outcome.path, "error": outcome.problem})
            else:
                record, size, item_notes = outcome
                writer.write(record)
                sizes[f"{size[0]}x{size[1]}"] += 1
                notes += [{"file": item.name, "note": note} for note in item_notes]
            bar.update(index + 1)
    finally:
        if writer is not None:
            writer.close()
    return sizes, notes, sum(sizes.values())
