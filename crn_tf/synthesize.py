"""Batch synthesis: layout PNGs in, photos out, from a model_dir checkpoint, an exported SavedModel or ONNX.

    crn-synthesize --model_dir=runs/tiny --layouts=/work/shared/samples/cityscapes_layouts/256p_*.png \
        --output_dir=/tmp/photos            # tiny model: ~1 s per 256x512 layout on 2 CPU cores
    crn-synthesize --saved_model=exports/crn/1 --layouts=layouts/ --output_dir=out --grid --num_outputs=3
    crn-synthesize --onnx=exports/crn --layouts=layouts/ --output_dir=out    # onnxruntime, newest ONNX version

(also `python -m crn_tf.synthesize ...`). Layouts are colour (RGB/RGBA), palette-mode or single-channel
id PNGs (see crn_tf.labels.decode_label_image). Height and width must be multiples of the model's
`size_multiple`; `--resize=HxW` resizes layouts nearest-neighbour instead. One output per layout,
named after it (`<stem>.png`, or `<stem>_<u>.png` per image of a diverse collection); existing
outputs are kept unless `--overwrite`. The paper-width cityscapes_256p model takes several seconds
per image on a CPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import posixpath
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels
from crn_tf.config import CRNConfig, parse_size
from crn_tf.png import encode_png
from crn_tf.progress import Progress
from crn_tf.serving_contract import (
    ONNX_CONFIG_KEY,
    ONNX_GRAPH_KEY,
    ONNX_GRAPH_LABEL_IDS,
    ONNX_GRAPH_LAYOUT,
    ONNX_LABEL_SPACE_KEY,
    SERVING_DEFAULT,
    export_asset_paths,
    fits_size_multiple,
    resolve_onnx_path,
    resolve_version_dir,
)
from crn_tf.serving_graph import synthesize_ids, to_uint8  # noqa: F401 - to_uint8: part of this module's API

# ---- synthesizers -------------------------------------------------------------------------------


class Synthesizer:
    """Turns batches of label ids into photos; built by `from_model_dir`, `from_saved_model` or `from_onnx`.

    Attributes:
        label_space: the model's label space (to decode colour layouts and draw grids).
        num_outputs: k, images per layout.
        size_multiple: layout height and width must be multiples of this.
    """

    def __init__(self, fn, label_space: labels.LabelSpace, num_outputs: int, size_multiple: int, source: str):
        self._fn = fn
        self.label_space = label_space
        self.num_outputs = num_outputs
        self.size_multiple = size_multiple
        self.source = source

    def __call__(self, label_ids: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W] -> uint8 [N, k, H, W, 3]."""
        return np.asarray(self._fn(tf.constant(label_ids, tf.uint8)))

    @classmethod
    def from_model(cls, model, source: str = "<model>") -> Synthesizer:
        """From a CascadedRefinementNetwork (traced once per input size, as the export is)."""
        config = model.crn_config
        fn = tf.function(lambda ids: synthesize_ids(model, ids), reduce_retracing=True)
        space = config.get_label_space()
        return cls(fn, space, config.num_outputs, config.size_multiple, source)

    @classmethod
    def from_model_dir(cls, path: str) -> Synthesizer:
        """From a model_dir (latest checkpoint), a checkpoint prefix or a `.keras` file."""
        from crn_tf.model_dir import load_model

        return cls.from_model(load_model(path), source=path)

    @classmethod
    def from_saved_model(cls, export_dir: str) -> Synthesizer:
        """From a version directory written by crn-export (its `serving_default` signature), or from
        the export base, whose newest numbered version is used (as TF Serving does)."""
        export_dir, _ = resolve_version_dir(export_dir)
        config_path, space_path = export_asset_paths(export_dir)
        if not tf.io.gfile.exists(config_path):
            raise ValueError(
                f"{export_dir}: not a crn-export SavedModel version directory ({config_path} not found; "
                "pass the export base or a numbered version in it, e.g. exports/crn or exports/crn/1)"
            )
        config = CRNConfig.from_dict(fileio.read_json(config_path))
        with tf.io.gfile.GFile(space_path, "r") as f:
            space = labels.LabelSpace.from_json(f.read(), source=space_path)
        loaded = fileio.load_saved_model(export_dir)  # literally: `run[1]/` is no pattern
        signature = loaded.signatures[SERVING_DEFAULT]
        k = config.num_outputs

        def fn(ids):
            outputs = signature(label_ids=ids)
            # [N, k, H, W, 3]; k = 1 models only have `image` [N, H, W, 3].
            return outputs["images"] if k > 1 else outputs["image"][:, None]

        synthesizer = cls(fn, space, k, config.size_multiple, export_dir)
        synthesizer._loaded = loaded  # keep the SavedModel's variables alive
        return synthesizer

    @classmethod
    def from_onnx(cls, path: str, providers: Sequence[str] | None = None) -> Synthesizer:
        """From an ONNX export of crn-export (`--format=onnx`), run with onnxruntime.

        Args:
            path: an ONNX file (`model.onnx`, uint8 ids in; or `generator.onnx`, one-hot float in, with
                one-hot, clipping and rounding done here in numpy), a version directory
                (`exports/crn/onnx/1`: its model.onnx), or `exports/crn/onnx` or the export base
                `exports/crn`, whose newest ONNX version is used.
            providers: onnxruntime execution providers; default CUDA if available, then CPU.

        Raises:
            ImportError: onnxruntime is not installed.
            ValueError: no ONNX export at `path`, or the file lacks crn-export's metadata.
        """
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"--onnx needs onnxruntime ({e}): pip install 'crn_tf[onnx]'") from e
        path = resolve_onnx_path(path)
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            session = ort.InferenceSession(data, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types for invalid files
            raise ValueError(f"{path}: onnxruntime cannot load it as an ONNX model ({e})") from e
        metadata = session.get_modelmeta().custom_metadata_map
        missing = [k for k in (ONNX_CONFIG_KEY, ONNX_LABEL_SPACE_KEY, ONNX_GRAPH_KEY) if k not in metadata]
        graph = metadata.get(ONNX_GRAPH_KEY)
        if missing or graph not in (ONNX_GRAPH_LABEL_IDS, ONNX_GRAPH_LAYOUT):
            raise ValueError(
                f"{path}: not an ONNX file written by crn-export (metadata {ONNX_GRAPH_KEY}={graph!r}, "
                f"missing {missing}); export one with crn-export --format=onnx"
            )
        config = CRNConfig.from_dict(json.loads(metadata[ONNX_CONFIG_KEY]))
        space = labels.LabelSpace.from_json(metadata[ONNX_LABEL_SPACE_KEY], source=f"{path} metadata")
        k, m = config.num_outputs, config.size_multiple

        def fn(ids):
            ids = np.asarray(ids, np.uint8)  # [N, H, W]
            check_size(ids.shape[1:3], m, path)  # the ONNX graph has no size check
            if graph == ONNX_GRAPH_LABEL_IDS:
                (images,) = session.run(["images" if k > 1 else "image"], {"label_ids": ids})
                return images if k > 1 else images[:, None]  # [N, k, H, W, 3]
            classes = np.where(ids < config.num_classes, ids, config.num_classes)  # out of range -> void
            layout = np.eye(config.input_channels, dtype=np.float32)[classes]  # [N, H, W, C + 1]
            (images,) = session.run(["image"], {"layout": layout})  # [N, H, W, 3k] float
            images = np.round(np.clip(images, 0.0, 255.0)).astype(np.uint8)  # as to_uint8
            n, h, w = ids.shape
            return images.reshape(n, h, w, k, 3).transpose(0, 3, 1, 2, 4)  # [N, k, H, W, 3]

        synthesizer = cls(fn, space, k, m, path)
        synthesizer._session = session
        return synthesizer


# ---- files --------------------------------------------------------------------------------------


def _glob_in_literal_folder(pattern: str) -> list[str]:
    """Matches of `pattern` whose folder part is taken literally: `run[1]/*.png` lists the folder
    `run[1]` (tf.io.gfile.glob would read `[1]` as a character class and find nothing). A pattern whose
    folder does not exist as written is globbed whole (`layouts/*/city_*.png`)."""
    folder, name = posixpath.split(pattern)
    if tf.io.gfile.isdir(folder or "."):
        names = tf.io.gfile.listdir(folder or ".")
        return sorted(posixpath.join(folder, n.rstrip("/")) for n in names if fnmatch.fnmatchcase(n.rstrip("/"), name))
    return sorted(tf.io.gfile.glob(pattern))


def list_layouts(spec: str | Sequence[str]) -> list[str]:
    """Layout paths from a folder (its *.png), a glob pattern, a file, or a comma-separated list of those.

    Existing folders and files are taken literally even when their names hold glob characters (`[1]`);
    only an entry that names nothing as written is a pattern.

    Raises:
        ValueError: naming the entry that matched nothing.
    """
    entries = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
    paths = []
    for entry in entries:
        if tf.io.gfile.isdir(entry):
            found = _glob_in_literal_folder(f"{entry.rstrip('/')}/*.png")
        elif tf.io.gfile.exists(entry):
            found = [entry]
        elif any(c in entry for c in "*?["):
            found = [p for p in _glob_in_literal_folder(entry) if not tf.io.gfile.isdir(p)]
        else:
            found = []
        if not found:
            raise ValueError(
                f"--layouts entry {entry!r} matches no layout file (expected a folder of PNGs, a glob or a file)"
            )
        paths.extend(found)
    if not paths:
        raise ValueError("--layouts is empty: give a folder, a glob or a comma-separated list of layout PNGs")
    return paths


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, reading only its header."""
    from PIL import Image

    with tf.io.gfile.GFile(path, "rb") as f:
        try:
            with Image.open(f) as image:
                return image.size[1], image.size[0]
        except Exception as e:  # PIL raises many types for corrupt files
            raise ValueError(f"{path}: not a readable image ({e})") from e


def check_size(size: tuple[int, int], multiple: int, source: str) -> None:
    """Raises a ValueError naming `source` unless both sides are positive multiples of `multiple`."""
    h, w = size
    if not fits_size_multiple(h, w, multiple):
        raise ValueError(
            f"{source}: layout is {h}x{w}, but this model needs height and width that are multiples of "
            f"{multiple}; resize the layout or pass --resize=HxW (nearest neighbour)"
        )


def resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of label ids uint8 [H, W] to `size` (height, width)."""
    from PIL import Image

    if ids.shape == size:
        return ids
    return np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))


def output_names(layout_path: str, num_outputs: int, grid: bool = False) -> list[str]:
    """Output file names for a layout: `<stem>.png` (one image or a grid), else `<stem>_<u>.png`, u < num_outputs."""
    stem = posixpath.splitext(posixpath.basename(layout_path))[0]
    return [f"{stem}.png"] if num_outputs == 1 or grid else [f"{stem}_{u}.png" for u in range(num_outputs)]


@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """How `synthesize_files` writes its outputs.

    Attributes:
        output_dir: folder for the photos (created).
        batch_size: layouts per model call (consecutive layouts of the same size are batched).
        num_outputs: images of each collection to write (1..k); one file each.
        grid: write `layout | photo(s)` side by side instead of the photos alone.
        overwrite: replace existing outputs instead of refusing.
        resize: (height, width) to resize every layout to (nearest neighbour), or None.
    """

    output_dir: str
    batch_size: int = 4
    num_outputs: int = 1
    grid: bool = False
    overwrite: bool = False
    resize: tuple[int, int] | None = None


def _batches(items: list, key, batch_size: int) -> Iterator[list]:
    """Consecutive runs of items with equal key, cut into lists of at most batch_size."""
    batch = []
    for item in items:
        if batch and (len(batch) == batch_size or key(batch[-1]) != key(item)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def synthesize_files(
    synthesizer: Synthesizer, layout_paths: Sequence[str], options: SynthesisOptions, progress: bool = True
) -> list[str]:
    """Synthesizes a photo (or a collection) for each layout file; returns the written paths.

    Everything that can be checked before the first model call is: the flags, every layout's size
    and every output name (so a bad file fails in a second, not after an hour of synthesis).

    Raises:
        ValueError: naming the layout or output file (size not a valid multiple, unreadable image,
            output exists without `overwrite`, num_outputs larger than the model's k, ...).
    """
    if not 1 <= options.num_outputs <= synthesizer.num_outputs:
        raise ValueError(
            f"--num_outputs={options.num_outputs}, but {synthesizer.source} synthesizes "
            f"{synthesizer.num_outputs} image(s) per layout; choose 1..{synthesizer.num_outputs}"
        )
    if options.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {options.batch_size}")
    stems = {}
    jobs = []  # (layout path, size it is synthesized at, output paths)
    for path in layout_paths:
        size = options.resize or image_size(path)
        check_size(size, synthesizer.size_multiple, "--resize" if options.resize else path)
        names = output_names(path, options.num_outputs, options.grid)
        if names[0] in stems:
            raise ValueError(f"{path} and {stems[names[0]]} would both write {names[0]}: rename one of them")
        stems[names[0]] = path
        outputs = [f"{options.output_dir}/{n}" for n in names]
        for out in outputs:
            if not options.overwrite and tf.io.gfile.exists(out):
                raise ValueError(f"{out} exists; pass --overwrite to replace it")
        jobs.append((path, size, outputs))
    tf.io.gfile.makedirs(options.output_dir)

    bar = Progress(len(jobs), unit="layouts", enabled=progress)
    written = []
    space = synthesizer.label_space
    for batch in _batches(jobs, key=lambda job: job[1], batch_size=options.batch_size):
        ids = []
        for path, size, _ in batch:
            layout = labels.read_label_image(path, space)  # [H, W] uint8
            ids.append(resize_ids(layout, size) if options.resize else layout)
        images = synthesizer(np.stack(ids))  # [B, k, H, W, 3]
        for (_, _, outputs), layout, collection in zip(batch, ids, images):
            if options.grid:
                colour = labels.ids_to_colors(layout, space)
                row = np.concatenate([colour, *collection[: options.num_outputs]], axis=1)  # [H, (1+n)W, 3]
                fileio.atomic_write(outputs[0], encode_png(row))
                written.append(outputs[0])
                continue
            for out, image in zip(outputs, collection):
                fileio.atomic_write(out, encode_png(image))
                written.append(out)
        bar.update(bar.done + len(batch))
    bar.finish()
    return written


def synthesize_layouts(
    layouts: str | Sequence[str],
    options: SynthesisOptions,
    model_dir: str | None = None,
    saved_model: str | None = None,
    onnx: str | None = None,
) -> list[str]:
    """crn-synthesize's job: the layouts (`list_layouts`) through the model of exactly one of `model_dir`,
    `saved_model` (an export base or version) and `onnx`; returns the written paths.

    Raises:
        ValueError: not exactly one model, or a bad model, layout or output (naming it).
        ImportError: `onnx` without onnxruntime.
    """
    if sum(bool(v) for v in (model_dir, saved_model, onnx)) != 1:
        raise ValueError("give exactly one of --model_dir, --saved_model and --onnx")
    if saved_model:
        synthesizer = Synthesizer.from_saved_model(saved_model)
    elif onnx:
        synthesizer = Synthesizer.from_onnx(onnx)
    else:
        synthesizer = Synthesizer.from_model_dir(model_dir)
    return synthesize_files(synthesizer, list_layouts(layouts), options)


# ---- command line -------------------------------------------------------------------------------


def define_flags() -> None:
    """Defines the crn-synthesize flags (not at import: the library is imported by other CLIs)."""
    from absl import flags

    flags.DEFINE_string("model_dir", None, "model_dir (latest checkpoint), checkpoint prefix or .keras file")
    flags.DEFINE_string("saved_model", None, "a crn-export base (newest version) or version dir, e.g. exports/crn")
    flags.DEFINE_string(
        "onnx", None, "run with onnxruntime: a crn-export base (newest ONNX version), version dir or .onnx file"
    )
    flags.DEFINE_string("layouts", None, "folder of layout PNGs, glob, or comma-separated list", required=True)
    flags.DEFINE_string("output_dir", None, "where the photos go (created)", required=True)
    flags.DEFINE_integer("batch_size", 4, "layouts per model call")
    flags.DEFINE_integer("num_outputs", 1, "images of a diverse model's collection to write per layout")
    flags.DEFINE_bool("grid", False, "write layout | photo(s) side by side")
    flags.DEFINE_bool("overwrite", False, "replace existing outputs")
    flags.DEFINE_string("resize", None, "HxW: resize layouts nearest-neighbour to this size first")


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    fileio.quiet_absl_logging()
    if sum(bool(v) for v in (FLAGS.model_dir, FLAGS.saved_model, FLAGS.onnx)) != 1:
        raise app.UsageError("give exactly one of --model_dir, --saved_model and --onnx")
    try:
        written = synthesize_layouts(
            FLAGS.layouts,
            SynthesisOptions(
                output_dir=FLAGS.output_dir, batch_size=FLAGS.batch_size, num_outputs=FLAGS.num_outputs,
                grid=FLAGS.grid, overwrite=FLAGS.overwrite, resize=parse_size(FLAGS.resize, "--resize"),
            ),
            model_dir=FLAGS.model_dir, saved_model=FLAGS.saved_model, onnx=FLAGS.onnx,
        )  # fmt: skip
    except (ValueError, ImportError) as e:  # bad flags or input files: one clear line, no traceback
        sys.exit(f"crn-synthesize: {e}")
    print(f"wrote {len(written)} file(s) to {FLAGS.output_dir}")


def run() -> None:
    """Console-script entry point: `crn-synthesize`."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
