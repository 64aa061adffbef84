"""Import the authors' released TF1 CRN checkpoints (github.com/CQFIO/PhotographicImageSynthesis)
into a crn_tf model_dir:

    crn-import-original --checkpoint=result_512p/model.ckpt --preset=cityscapes_512p --model_dir=models/cs512
    # or: python -m crn_tf.convert_original ...; ~5 s and ~1.5 GB of RAM on a CPU for a ~98M-parameter model

The checkpoint is read with `tf.train.load_checkpoint` (no TF1 graph, no .meta file). Only the
generator's variables are used; Adam slots (`.../Adam`, `.../Adam_1`, `beta1_power`, ...) and any
other non-generator variable are ignored. The original generator, as a TF1 variable map:

    g_{sp}_conv1/weights              [3, 3, d_prev + C, d]   (d_prev = 0 for the first module)
    g_{sp}_conv1/LayerNorm/{beta,gamma}  [d]
    g_{sp}_conv2/weights              [3, 3, d, d]
    g_{sp}_conv2/LayerNorm/{beta,gamma}  [d]
    g_{sp_last}_conv100/weights       [1, 1, d_last, 3k]
    g_{sp_last}_conv100/biases        [3k]

Module `sp` works at sp x 2sp (sp = 4, 8, ...) and becomes crn_tf's `module_{sp}x{2sp}`. The
weights keep their layout (both are HWIO); slim's LayerNorm gamma/beta become the module's
GroupNormalization(groups=1) gamma/beta. The original's k-image head puts image u in channels
(u, u + k, u + 2k) (all red planes, then green, then blue); crn_tf puts it in 3u..3u+2, so the
head's output channels are permuted. The imported config uses `align_corners` upsampling, as the
original did, so the imported model computes what the original computed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf
from absl import logging

from crn_tf import fileio, labels
from crn_tf.config import PRESETS, CRNConfig, get_preset
from crn_tf.model import CascadedRefinementNetwork
from crn_tf.model_dir import latest_checkpoint, save_model_dir

# A generator variable of the original: module height, conv (1, 2 or the 100 head), variable.
GENERATOR_VARIABLE = re.compile(r"^g_(\d+)_conv(1|2|100)/(weights|biases|LayerNorm/beta|LayerNorm/gamma)$")
# Architecture fields an import determines; the rest of a CRNConfig (loss weights) only matters
# for further training and comes from the preset or the CRNConfig defaults.
ARCHITECTURE_FIELDS = ("label_space", "num_classes", "widths", "base_height", "base_width", "num_outputs")


class CheckpointDataError(ValueError):
    """The checkpoint's index reads, but a tensor's bytes in its data file do not (checksum, size)."""


@dataclasses.dataclass(frozen=True)
class OriginalCheckpoint:
    """The generator variables found in an original checkpoint.

    Attributes:
        prefix: the checkpoint prefix (`.../model.ckpt`).
        shapes: generator variable name -> shape.
        ignored: names of the other variables (optimizer slots and state, anything not g_...).
    """

    prefix: str
    shapes: dict[str, tuple[int, ...]]
    ignored: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What `import_original` wrote.

    Attributes:
        model_dir: the crn_tf model_dir written.
        checkpoint: the crn_tf checkpoint inside it.
        config: the imported model's config.
        source: the original checkpoint's prefix.
        num_variables: generator variables imported.
        num_ignored: checkpoint variables ignored (optimizer slots and state).
        matching_presets: presets with the same architecture as the imported model.
    """

    model_dir: str
    checkpoint: str
    config: CRNConfig
    source: str
    num_variables: int
    num_ignored: int
    matching_presets: tuple[str, ...]

    def summary(self, preset_given: bool = True) -> str:
        """What was imported, for the console; without a preset, the presets this architecture matches."""
        c = self.config
        lines = [
            f"imported {self.source}: {self.num_variables} generator variables "
            f"({self.num_ignored} optimizer/other variables ignored)",
            f"config {c.name}: {c.num_modules} modules, widths {list(c.widths)}, k={c.num_outputs}, "
            f"{c.num_classes} classes ({c.label_space}), native size {c.native_size[0]}x{c.native_size[1]}, "
            f"{c.num_parameters() / 1e6:.1f}M parameters",
            f"wrote {self.checkpoint}",
        ]
        if not preset_given and self.matching_presets:
            presets = ", ".join(self.matching_presets)
            lines.append(f"architecture matches preset(s) {presets}; pass --preset to take its loss weights")
        return "\n".join(lines)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint prefix for `path`: a prefix (`.../model.ckpt`) or a directory holding one.

    A directory is resolved through its `checkpoint` state file, or else `model.ckpt` in it (the
    released folders' name; their state file may hold the authors' absolute paths).
    """
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.isdir(path):
        # Not tf.train.latest_checkpoint: it globs, and finds nothing under `run[1]/`.
        state = tf.train.get_checkpoint_state(path) if tf.io.gfile.exists(f"{path}/checkpoint") else None
        latest = state.model_checkpoint_path if state is not None else None
        if latest and tf.io.gfile.exists(latest + ".index"):
            return latest
        if tf.io.gfile.exists(f"{path}/model.ckpt.index"):
            return f"{path}/model.ckpt"
        raise ValueError(f"{path}: directory holds no TF checkpoint (expected model.ckpt.index)")
    raise ValueError(
        f"{path}: not a TF checkpoint (expected {path}.index and {path}.data-*; pass the prefix, "
        "e.g. result_512p/model.ckpt, or its directory)"
    )


def _is_slot(name: str, generator: set[str]) -> bool:
    """True for an optimizer slot of a generator variable (`g_4_conv1/weights/Adam`, ...)."""
    return "/" in name and name.rsplit("/", 1)[0] in generator


def read_original_checkpoint(path: str) -> OriginalCheckpoint:
    """Lists the generator variables of an original CRN checkpoint.

    Args:
        path: checkpoint prefix or directory.

    Raises:
        ValueError: the file is not a checkpoint, holds no CRN generator, or holds `g_` variables
            this importer does not know (it would otherwise drop them silently).
    """
    prefix = resolve_checkpoint(path)
    try:
        with fileio.literal_path(prefix) as readable:  # the reader globs: `run[1]/` is no pattern
            shape_map = tf.train.load_checkpoint(readable).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"{prefix}: cannot read checkpoint ({e})") from e
    shapes = {n: tuple(int(d) for d in s) for n, s in shape_map.items() if GENERATOR_VARIABLE.match(n)}
    if not shapes:
        found = sorted(shape_map)
        raise ValueError(
            f"{prefix}: not a CRN generator checkpoint: no variables named g_<height>_conv1/weights, "
            f"g_<height>_conv1/LayerNorm/gamma, ...; it holds {len(found)} variables, e.g. {found[:5]}"
        )
    others = sorted(n for n in shape_map if n not in shapes)
    unknown = [n for n in others if n.startswith("g_") and not _is_slot(n, set(shapes))]
    if unknown:
        raise ValueError(
            f"{prefix}: generator variables this importer does not know: {unknown[:10]} (expected only "
            "g_<h>_conv{1,2}/weights, g_<h>_conv{1,2}/LayerNorm/{beta,gamma}, g_<h>_conv100/{weights,biases} "
            "and their optimizer slots)"
        )
    return OriginalCheckpoint(prefix=prefix, shapes=shapes, ignored=tuple(others))


def module_heights(config: CRNConfig) -> tuple[int, ...]:
    """The original's module names `sp`: each module's height at the native size, coarsest first."""
    return tuple(config.base_height * 2**i for i in range(config.num_modules))


def expected_shapes(config: CRNConfig) -> dict[str, tuple[int, ...]]:
    """The original checkpoint's generator variables and shapes for a config."""
    shapes = {}
    prev = 0
    for sp, width in zip(module_heights(config), config.widths):
        for conv, cin in (("conv1", prev + config.input_channels), ("conv2", width)):
            shapes[f"g_{sp}_{conv}/weights"] = (3, 3, cin, width)
            shapes[f"g_{sp}_{conv}/LayerNorm/beta"] = (width,)
            shapes[f"g_{sp}_{conv}/LayerNorm/gamma"] = (width,)
        prev = width
    head = f"g_{module_heights(config)[-1]}_conv100"
    shapes[f"{head}/weights"] = (1, 1, prev, 3 * config.num_outputs)
    shapes[f"{head}/biases"] = (3 * config.num_outputs,)
    return shapes


def shape_mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """One line per variable that is missing, unexpected or of another shape; empty if they agree."""

    def key(name):  # module order, not string order
        m = GENERATOR_VARIABLE.match(name)
        return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else (0, 0, name)

    problems = []
    for name in sorted(set(expected) | set(found), key=key):
        if name not in found:
            problems.append(f"{name}: missing from the checkpoint (expected shape {list(expected[name])})")
        elif name not in expected:
            problems.append(f"{name}: in the checkpoint (shape {list(found[name])}) but not expected")
        elif tuple(found[name]) != tuple(expected[name]):
            problems.append(f"{name}: checkpoint has shape {list(found[name])}, expected {list(expected[name])}")
    return problems


def _label_space_for(num_classes: int, label_space: str | None) -> str:
    if label_space is not None:
        return label_space
    for space in labels.LABEL_SPACES.values():
        if space.num_classes == num_classes:
            return space.name
    built_in = ", ".join(f"{s.name}: {s.num_classes}" for s in labels.LABEL_SPACES.values())
    raise ValueError(
        f"the checkpoint's layout has {num_classes} classes + void, which no built-in label space has "
        f"({built_in}); pass label_space (--label_space) as a palette JSON"
    )


def infer_config(original: OriginalCheckpoint, label_space: str | None = None) -> CRNConfig:
    """The CRNConfig of the generator stored in an original checkpoint, read from variable shapes.

    Module heights come from the g_{sp}_ names, widths from the kernels, the number of classes from
    the first module's input channels, k from the head's channels. Loss weights (which only matter
    for further training) are CRNConfig's defaults.

    Raises:
        ValueError: the variables do not form a cascade (naming the variables that are missing or
            of the wrong shape).
    """
    prefix, shapes = original.prefix, original.shapes
    heights = sorted({int(GENERATOR_VARIABLE.match(n).group(1)) for n in shapes})
    heads = sorted({int(GENERATOR_VARIABLE.match(n).group(1)) for n in shapes if "_conv100/" in n})
    if not heads:
        raise ValueError(f"{prefix}: no output head (g_<height>_conv100/weights) in the checkpoint")
    if heads != [heights[-1]]:
        raise ValueError(f"{prefix}: expected one head, at the last module g_{heights[-1]}_; found heads at {heads}")
    base = heights[0]
    num_modules = int(np.log2(heights[-1] // base)) + 1 if heights[-1] % base == 0 else 0
    if heights != [base * 2**i for i in range(num_modules)]:
        raise ValueError(
            f"{prefix}: module heights {heights} are not a cascade that doubles from {base} "
            f"(expected {[base * 2**i for i in range(max(num_modules, 1))]})"
        )
    widths = []
    for sp in heights:
        name = f"g_{sp}_conv1/weights"
        if name not in shapes or len(shapes[name]) != 4:
            raise ValueError(f"{prefix}: {name} is missing or not a conv kernel ({shapes.get(name)})")
        widths.append(shapes[name][3])
    first = shapes[f"g_{base}_conv1/weights"]
    head = shapes.get(f"g_{heights[-1]}_conv100/weights")
    if head is None or len(head) != 4 or head[3] % 3:
        raise ValueError(
            f"{prefix}: g_{heights[-1]}_conv100/weights has shape {head}; expected [1, 1, width, 3k] (RGB images)"
        )
    num_classes = first[2] - 1
    config = CRNConfig(
        name=f"imported_{heights[-1]}p",
        label_space=_label_space_for(num_classes, label_space),
        num_classes=num_classes,
        widths=tuple(widths),
        base_height=base,
        base_width=2 * base,  # the original's module sp works at sp x 2sp
        num_outputs=head[3] // 3,
        upsampling="align_corners",
        normalization="layer",
    )
    problems = shape_mismatches(expected_shapes(config), shapes)
    if problems:
        raise ValueError(f"{prefix}: not a consistent CRN generator:\n  " + "\n  ".join(problems))
    return config


def config_from_preset(original: OriginalCheckpoint, preset: str, label_space: str | None = None) -> CRNConfig:
    """The named preset, checked against the checkpoint's variables, with the original's upsampling.

    Raises:
        ValueError: naming every variable whose shape the preset disagrees with (both shapes),
            and what the checkpoint looks like instead.
    """
    config = get_preset(preset)
    overrides = {"upsampling": "align_corners"}
    if label_space is not None:
        overrides["label_space"] = label_space
    if config.upsampling != "align_corners":
        logging.warning("preset %s uses %s upsampling; the original used align_corners", preset, config.upsampling)
    config = dataclasses.replace(config, **overrides)
    problems = shape_mismatches(expected_shapes(config), original.shapes)
    if problems:
        try:
            inferred = infer_config(original, label_space)
            hint = (
                f"\nThe checkpoint looks like: {inferred.num_classes} classes, widths {list(inferred.widths)}, "
                f"k={inferred.num_outputs}, base {inferred.base_height}x{inferred.base_width}"
            )
            match = matching_presets(inferred)
            hint += f" (preset {', '.join(match)})." if match else "; omit the preset to import it as it is."
        except ValueError as e:
            hint = f"\n(The architecture could not be inferred either: {e})"
        raise ValueError(
            f"{original.prefix} does not match preset {preset!r} ({len(problems)} problems):\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            + hint
        )
    return config


def matching_presets(config: CRNConfig) -> tuple[str, ...]:
    """Names of the presets whose architecture equals `config`'s."""
    return tuple(
        name
        for name, preset in PRESETS.items()
        if all(getattr(preset, f) == getattr(config, f) for f in ARCHITECTURE_FIELDS)
    )


def head_permutation(num_outputs: int) -> np.ndarray:
    """Output channel order: crn_tf channel 3u + c (image u, colour c) = original channel c*k + u."""
    k = num_outputs
    return np.array([c * k + u for u in range(k) for c in range(3)], dtype=np.int64)


def assign_original_weights(model: CascadedRefinementNetwork, prefix: str) -> int:
    """Copies an original checkpoint's generator variables into `model`; returns how many.

    `model.crn_config` must describe the checkpoint (see `infer_config` / `config_from_preset`).
    Every model variable is assigned exactly once.
    """
    config = model.crn_config
    pairs = []  # (original name, keras variable, numpy transform)
    for sp, module in zip(module_heights(config), model.refinement_modules):
        for conv, norm, scope in ((module.conv1, module.norm1, "conv1"), (module.conv2, module.norm2, "conv2")):
            pairs.append((f"g_{sp}_{scope}/weights", conv.kernel, None))
            pairs.append((f"g_{sp}_{scope}/LayerNorm/gamma", norm.gamma, None))
            pairs.append((f"g_{sp}_{scope}/LayerNorm/beta", norm.beta, None))
    head = f"g_{module_heights(config)[-1]}_conv100"
    perm = head_permutation(config.num_outputs)
    pairs.append((f"{head}/weights", model.head.conv.kernel, lambda w: w[..., perm]))
    pairs.append((f"{head}/biases", model.head.conv.bias, lambda b: b[perm]))

    assigned = {id(v) for _, v, _ in pairs}
    missed = [v.path for v in model.weights if id(v) not in assigned]
    if missed or len(assigned) != len(pairs):
        raise RuntimeError(f"importer does not cover the model's variables: unassigned {missed}")
    with fileio.literal_path(prefix) as readable:  # the reader globs: `run[1]/` is no pattern
        reader = tf.train.load_checkpoint(readable)
        for name, variable, transform in pairs:
            try:
                value = reader.get_tensor(name)
            except tf.errors.OpError as e:  # a damaged or missing data file (checksum, size), not the index
                raise CheckpointDataError(
                    f"{prefix}: cannot read {name} from the checkpoint's data file ({e.message}); the .data-* file "
                    "is damaged, incomplete or does not belong to this .index"
                ) from e
            if transform is not None:
                value = transform(value)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{prefix}: {name} has shape {list(value.shape)}, model variable {variable.path} "
                    f"needs {list(variable.shape)}"
                )
            variable.assign(value.astype(variable.dtype))
    return len(pairs)


def check_destination(model_dir: str, overwrite: bool) -> None:
    """Refuses a `model_dir` that is not a directory, or is a non-empty one without `overwrite`."""
    if not tf.io.gfile.exists(model_dir):
        return
    if not tf.io.gfile.isdir(model_dir):
        raise ValueError(f"{model_dir}: exists and is not a directory")
    if tf.io.gfile.listdir(model_dir) and not overwrite:
        raise ValueError(f"{model_dir}: exists and is not empty; choose another model_dir or pass --overwrite")


def import_original(
    checkpoint: str,
    model_dir: str,
    preset: str | None = None,
    label_space: str | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Imports an original TF1 CRN checkpoint into a new crn_tf model_dir.

    The model_dir is built beside `model_dir` under a temporary name and renamed into place when
    complete, so a failure leaves no partial model_dir.

    Args:
        checkpoint: the original checkpoint prefix (`result_512p/model.ckpt`) or its directory.
        model_dir: where to write the crn_tf model_dir (crn_config.json + ckpt-0).
        preset: if given, the preset the checkpoint must match (its loss weights are kept for
            further training); if None, the architecture is inferred and named `imported_<h>p`.
        label_space: label space name or palette JSON; None = the preset's, or the built-in one
            with the checkpoint's number of classes.
        overwrite: replace an existing non-empty `model_dir`.

    Returns:
        An ImportResult describing what was written.

    Raises:
        ValueError: not a CRN checkpoint, a preset that disagrees (naming each variable and both
            shapes), missing variables, or an existing non-empty model_dir without `overwrite`.
    """
    model_dir = model_dir.rstrip("/")
    check_destination(model_dir, overwrite)
    original = read_original_checkpoint(checkpoint)
    if preset is None:
        config = infer_config(original, label_space)
    else:
        config = config_from_preset(original, preset, label_space)
    logging.info("importing %s as %s (%d ignored variables)", original.prefix, config, len(original.ignored))
    model = CascadedRefinementNetwork(config)
    num_variables = assign_original_weights(model, original.prefix)

    tmp = fileio.temporary_name(model_dir)
    try:
        save_model_dir(model, tmp, step=0)
        fileio.replace_directory(tmp, model_dir)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    ckpt = latest_checkpoint(model_dir)  # not tf.train.latest_checkpoint: it globs
    return ImportResult(
        model_dir=model_dir,
        checkpoint=ckpt,
        config=config,
        source=original.prefix,
        num_variables=num_variables,
        num_ignored=len(original.ignored),
        matching_presets=matching_presets(config),
    )
