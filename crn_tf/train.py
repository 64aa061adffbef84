"""crn-train: flags in, one experiment out (crn_tf.experiment resolves them, crn_tf.trainer runs it).

    crn-train --preset=tiny --data_dir=/tmp/crn_data --model_dir=/tmp/crn_tiny --steps=300 --vgg_weights=none
    # ~2 min on 2 CPU cores; the paper's 256p model: crn-train --preset=cityscapes_256p ... (one 24+ GB GPU)
    crn-train --flagfile=/tmp/crn_tiny/flags.txt     # the same run again (or its resumption)

The same code runs on one CPU, N GPUs (MirroredStrategy) and N machines (MultiWorkerMirroredStrategy
from TF_CONFIG). The library names crn_tf.train exported before the split (Trainer, TrainConfig, ...) are
re-exported here.
"""

from __future__ import annotations

import sys

from absl import app, flags

from crn_tf import fileio
from crn_tf.config import PRESETS
from crn_tf.distribution import (  # noqa: F401 - re-exported: crn_tf.train's names before the split
    ALL_REDUCE_IMPLEMENTATIONS,
    STRATEGIES,
    is_chief,
    make_strategy,
    no_gradient_aggregation,
)
from crn_tf.experiment import (  # noqa: F401 - re-exported
    TrainConfig,
    check_loss_size,
    describe,
    parse_train_modules,
    resolve_experiment,
)
from crn_tf.losses import LOSS_KINDS
from crn_tf.model_dir import init_from  # noqa: F401 - re-exported
from crn_tf.summaries import colorize_layout, sample_grid  # noqa: F401 - re-exported
from crn_tf.trainer import (  # noqa: F401 - re-exported
    TRAIN_CONFIG_FILENAME,
    TRAIN_HISTORY_FILENAME,
    Trainer,
    TrainingDiverged,
    config_conflicts,
    train_experiment,
)

# crn-train's flags: what resolve_experiment reads and flags.txt records.
FLAG_NAMES = (
    "preset", "num_outputs", "upsampling", "widths", "data_dir", "split", "size", "model_dir", "batch_size",
    "learning_rate", "steps", "epochs", "loss", "layer_weights", "rebalance_after", "vgg_weights", "vgg_pooling",
    "strategy", "mixed_precision", "clip_norm", "checkpoint_every", "summary_every", "image_every", "sample_split",
    "keep_checkpoints", "init_from", "train_modules", "jit_compile", "remat", "inter_op_threads", "seed",
    "deterministic",
    "all_reduce_implementation", "all_reduce_pack_mb", "all_reduce_dtype",
)  # fmt: skip


def define_flags(fv: flags.FlagValues | None = None) -> None:
    """Defines crn-train's flags on `fv` (default: absl's global FLAGS)."""
    fv = flags.FLAGS if fv is None else fv
    flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "Model preset (crn_tf/config.py).", flag_values=fv)
    flags.DEFINE_integer("num_outputs", None, "Override the preset's k (images per layout).", flag_values=fv)
    flags.DEFINE_enum(
        "upsampling", None, ["align_corners", "half_pixel"], "Override the upsampling mode.", flag_values=fv
    )
    flags.DEFINE_string("widths", None, "Override the module widths, comma-separated, coarsest first.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "Directory of TFRecord shards + {split}.json (crn-convert).", flag_values=fv)
    flags.DEFINE_string("split", "train", "Split to train on.", flag_values=fv)
    flags.DEFINE_string("size", None, "Training size HxW (default: the preset's native size).", flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Where checkpoints, summaries and samples go.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 1, "Global batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate.", flag_values=fv)
    flags.DEFINE_integer("steps", None, "Total training steps (or use --epochs).", flag_values=fv)
    flags.DEFINE_float("epochs", None, "Total epochs over the split (needs its manifest count).", flag_values=fv)
    flags.DEFINE_enum(
        "loss", "perceptual", list(LOSS_KINDS), "perceptual (paper) or image (eq. 4 baseline).", flag_values=fv
    )
    flags.DEFINE_enum(
        "layer_weights", "preset", ["preset", "auto"], "Preset's fixed weights or the paper's.", flag_values=fv
    )
    flags.DEFINE_float(
        "rebalance_after", 100, "Epochs after which automatic layer weights are rebalanced.", flag_values=fv
    )
    flags.DEFINE_string(
        "vgg_weights", "imagenet", "imagenet (Keras, downloaded once), none, or a weights file.", flag_values=fv
    )
    flags.DEFINE_enum("vgg_pooling", "avg", ["avg", "max"], "avg (the original) or max.", flag_values=fv)
    flags.DEFINE_enum("strategy", "auto", list(STRATEGIES), "Distribution strategy.", flag_values=fv)
    flags.DEFINE_enum(
        "mixed_precision", None, ["float16", "bfloat16"], "Mixed precision compute dtype.", flag_values=fv
    )
    flags.DEFINE_float(
        "clip_norm", None, "Clip the global gradient norm (after the cross-replica sum).", flag_values=fv
    )
    flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", flag_values=fv)
    flags.DEFINE_integer("summary_every", 50, "Steps between TensorBoard scalars.", flag_values=fv)
    flags.DEFINE_integer("image_every", 500, "Steps between TensorBoard image grids.", flag_values=fv)
    flags.DEFINE_string(
        "sample_split", "val", "Split whose first batch is drawn at each checkpoint (if present).", flag_values=fv
    )
    flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints to keep.", flag_values=fv)
    flags.DEFINE_string("init_from", None, "model_dir or checkpoint to initialise shared modules from.", flag_values=fv)
    flags.DEFINE_string("train_modules", "", "Modules to train: n (the n highest + head) or names.", flag_values=fv)
    flags.DEFINE_boolean("jit_compile", False, "XLA-compile the replica step (GPUs).", flag_values=fv)
    flags.DEFINE_boolean(
        "remat", False, "Recompute activations in the backward pass: less memory, more time.", flag_values=fv
    )
    flags.DEFINE_integer(
        "inter_op_threads",
        None,
        "Ops TensorFlow may run at once (default: its own choice; Intel's advice for CPUs: one per socket).",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "Random seed (initialisation and the order of the training data).", flag_values=fv)
    flags.DEFINE_boolean(
        "deterministic", False, "Deterministic ops (enable_op_determinism): a repeatable run.", flag_values=fv
    )
    flags.DEFINE_enum(
        "all_reduce_implementation",
        "auto",
        list(ALL_REDUCE_IMPLEMENTATIONS),
        "Gradient all-reduce: auto, ring, nccl.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "all_reduce_pack_mb", 0, "Pack gradients into all-reduces of ~this many MiB (0: TF decides).", flag_values=fv
    )
    flags.DEFINE_enum(
        "all_reduce_dtype",
        None,
        ["bfloat16", "float16"],
        "Send gradients in this dtype (half traffic).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["data_dir", "model_dir"], flag_values=fv)


def flags_text(fv: flags.FlagValues) -> str:
    """The crn-train flags as set, one a line: an absl flagfile (`crn-train --flagfile=...`)."""
    lines = [fv[name].serialize() for name in FLAG_NAMES]
    return "\n".join(line for line in lines if line) + "\n"


def train_from_flags(fv: flags.FlagValues | None = None) -> dict:
    """crn-train's body: the flags' experiment, trained."""
    fv = flags.FLAGS if fv is None else fv
    return train_experiment(resolve_experiment({n: fv[n].value for n in FLAG_NAMES}), flags_text=flags_text(fv))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fileio.quiet_absl_logging()
    try:
        train_from_flags()
    except (ValueError, TrainingDiverged) as e:  # bad flags, data or model_dir: a message, not a traceback
        sys.exit(f"crn-train: {e}")


def run() -> None:
    """Console entry point of crn-train."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
