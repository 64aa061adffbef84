"""The experiment record: one typed config of a training run (model, data, loss, training), resolved from a
preset and crn-train's flags, printed at the start and written into the model_dir, so that a model_dir says
exactly how it was made.

    model_dir/experiment.json            the latest run's ExperimentConfig (model, data, loss, training)
    model_dir/flags.txt                  its crn-train flags: `crn-train --flagfile=model_dir/flags.txt` repeats it
    model_dir/train_config_history.json  one entry per start (fresh or resumed): when, from which checkpoint,
                                         what changed, the training and data config (crn_tf.trainer)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import tensorflow as tf

from crn_tf.config import LOSS_LAYERS, CRNConfig, get_preset, parse_size
from crn_tf.distribution import ALL_REDUCE_IMPLEMENTATIONS, STRATEGIES, check_inter_op_threads
from crn_tf.losses import LOSS_KINDS
from crn_tf.vgg import POOLS_BEFORE, describe_weights

EXPERIMENT_FILENAME = "experiment.json"
FLAGS_FILENAME = "flags.txt"
# The TrainConfig fields that say how the loss is computed (the experiment record's `loss` section).
LOSS_FIELDS = ("loss", "automatic_weights", "rebalance_after", "rebalance_window", "vgg_weights", "vgg_pooling")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the model itself is a CRNConfig).

    Attributes:
        batch_size: global batch size, split over replicas (the original: 1).
        learning_rate: Adam's, constant (the original: 1e-4).
        steps: total optimizer steps of the run (resumed runs count from their checkpoint).
        loss: `perceptual` (eq. 1, 3) or `image` (the eq. 4 baseline).
        automatic_weights: the paper's layer weights (1/numel, rebalanced once) instead of the preset's.
        rebalance_after: steps after which automatic weights are rebalanced (paper: 100 epochs).
        rebalance_window: steps of term statistics the rebalancing averages (the last ones before it).
        vgg_weights: `imagenet`, `none` or a weights file; vgg_pooling: `avg` (original) or `max`.
        strategy: `auto`, `mirrored`, `multi_worker` or `one_device`.
        mixed_precision: None, `float16` (with dynamic loss scaling) or `bfloat16`.
        clip_norm: clip the global gradient norm (after the cross-replica sum) to this, if set.
        checkpoint_every, summary_every, image_every: intervals in steps.
        keep_checkpoints: how many checkpoints the manager keeps.
        init_from: model_dir or checkpoint of another (e.g. lower-resolution) model to start from.
        train_modules: names of the modules (and/or `head`) to train; others are frozen. None = all.
        jit_compile: XLA-compile the per-replica forward and backward (helps on GPUs; slower on this CPU).
        remat: recompute activations in the backward pass (tf.recompute_grad per refinement module but
            the last, whose backward pass comes first, and per VGG-19 block) instead of keeping them:
            less memory, more time; the same gradients.
        inter_op_threads: TensorFlow's inter-op threads (ops run at once) for the process; None or 0:
            TensorFlow's choice (crn_tf.distribution.configure_threads). Speed only: the same computation.
        seed: initialisation seed.
        all_reduce_implementation: the gradient all-reduce's collective implementation (`auto`, `ring`
            or `nccl`; tf.distribute.experimental.CommunicationOptions), honoured by collective
            all-reduces (MultiWorkerMirroredStrategy; MirroredStrategy uses its cross-device ops).
        all_reduce_pack_mb: pack the gradients into all-reduces of about this many MiB (0: TF decides).
        all_reduce_dtype: None (the gradients' dtype), `bfloat16` or `float16`: the gradients cross
            the replicas in this dtype (half the traffic) and are summed in it; the sum is cast back
            before clipping and the update. bfloat16 keeps float32's range (~3 significant digits);
            float16 can overflow above 65504 (with float16 loss scaling the step is then skipped).
    """

    batch_size: int = 1
    learning_rate: float = 1e-4
    steps: int = 1000
    loss: str = "perceptual"
    automatic_weights: bool = False
    rebalance_after: int = 0
    rebalance_window: int = 100
    vgg_weights: str = "imagenet"
    vgg_pooling: str = "avg"
    strategy: str = "auto"
    mixed_precision: str | None = None
    clip_norm: float | None = None
    checkpoint_every: int = 500
    summary_every: int = 50
    image_every: int = 500
    keep_checkpoints: int = 5
    init_from: str | None = None
    train_modules: tuple[str, ...] | None = None
    jit_compile: bool = False
    remat: bool = False
    inter_op_threads: int | None = None
    seed: int = 0
    all_reduce_implementation: str = "auto"
    all_reduce_pack_mb: float = 0.0
    all_reduce_dtype: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.steps < 0 or self.learning_rate <= 0:
            raise ValueError(
                f"need batch_size >= 1, steps >= 0 and learning_rate > 0; got {self.batch_size}, "
                f"{self.steps}, {self.learning_rate}"
            )
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"--loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mixed_precision not in (None, "float16", "bfloat16"):
            raise ValueError(f"--mixed_precision must be float16 or bfloat16, got {self.mixed_precision!r}")
        if self.vgg_pooling not in ("avg", "max"):
            raise ValueError(f"--vgg_pooling must be avg or max, got {self.vgg_pooling!r}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"--clip_norm must be positive, got {self.clip_norm}")
        for name in ("checkpoint_every", "summary_every", "image_every", "keep_checkpoints", "rebalance_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.train_modules is not None:
            object.__setattr__(self, "train_modules", tuple(self.train_modules))
        if self.all_reduce_implementation not in ALL_REDUCE_IMPLEMENTATIONS:
            raise ValueError(
                f"--all_reduce_implementation must be one of {ALL_REDUCE_IMPLEMENTATIONS}, "
                f"got {self.all_reduce_implementation!r}"
            )
        check_inter_op_threads(self.inter_op_threads)
        if self.all_reduce_pack_mb < 0:
            raise ValueError(f"--all_reduce_pack_mb must be >= 0, got {self.all_reduce_pack_mb}")
        if self.all_reduce_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"--all_reduce_dtype must be bfloat16 or float16, got {self.all_reduce_dtype!r}")

    @property
    def communication_options(self) -> tf.distribute.experimental.CommunicationOptions:
        """The gradient all-reduce's options."""
        return tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=int(self.all_reduce_pack_mb * 2**20),
            implementation=self.all_reduce_implementation.upper(),
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a run trains on.

    Attributes:
        data_dir: the folder of TFRecord shards + `{split}.json` (crn-convert).
        split: the split trained on.
        size: (height, width) the pairs are trained at.
        examples: the split's example count (its manifest's), from which epochs are counted.
        epochs: the epochs asked for (None: the run was given steps).
        sample_split: the split whose first batch is drawn at each checkpoint (if the data has it).
        deterministic: deterministic ops (enable_op_determinism): a repeatable run.
    """

    data_dir: str
    split: str = "train"
    size: tuple[int, int] = (16, 32)
    examples: int = 0
    epochs: float | None = None
    sample_split: str | None = "val"
    deterministic: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run is: the model (CRNConfig), the data, and how it is trained (TrainConfig: the
    optimizer, the schedule, the distribution and the loss, which `loss_config` shows on its own)."""

    model: CRNConfig
    data: DataConfig
    training: TrainConfig
    model_dir: str

    def loss_config(self) -> dict:
        """The loss section of the record: the TrainConfig's loss fields and the layer weights they give."""
        section = {k: getattr(self.training, k) for k in LOSS_FIELDS}
        automatic = self.training.automatic_weights or self.model.layer_weights is None
        section["layer_weights"] = "automatic" if automatic else list(self.model.layer_weights)
        return section

    def to_dict(self) -> dict:
        """The record as JSON-ready data: model, data, loss, training (the non-loss TrainConfig fields)."""
        training = dataclasses.asdict(self.training)
        record = {
            "model_dir": self.model_dir,
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "loss": self.loss_config(),
            "training": {k: v for k, v in training.items() if k not in LOSS_FIELDS},
        }
        return json.loads(json.dumps(record))  # tuples as JSON lists


def check_loss_size(config: CRNConfig, train_config: TrainConfig, size: Sequence[int]) -> None:
    """Refuses a training size too small for a VGG-19 layer the perceptual loss weights (after p poolings
    a layer needs 2^p pixels per side; below that its term is the mean of nothing: NaN)."""
    if train_config.loss != "perceptual":
        return
    automatic = train_config.automatic_weights or config.layer_weights is None
    weights = [1.0] * len(LOSS_LAYERS) if automatic else config.layer_weights
    for layer, weight in zip(LOSS_LAYERS, weights):
        need = 2 ** POOLS_BEFORE.get(layer, 0)
        if weight and min(size) < need:
            raise ValueError(
                f"training size {size[0]}x{size[1]} is too small for the perceptual loss of preset {config.name!r}: it "
                f"weights VGG-19 {layer}, which needs images of at least {need}x{need} pixels; train at a larger "
                "--size, or with --loss=image"
            )


def parse_train_modules(value: str, module_names: Sequence[str]) -> tuple[str, ...] | None:
    """`--train_modules`: empty = all; an integer n = the n highest-resolution modules and the head;
    else comma-separated names (`module_512x1024,module_1024x2048,head`)."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        n = int(value)
        if not 1 <= n <= len(module_names):
            raise ValueError(f"--train_modules={value}: this model has {len(module_names)} modules")
        return (*module_names[-n:], "head")
    return tuple(v.strip() for v in value.split(",") if v.strip())


def describe(
    config: CRNConfig, train_config: TrainConfig, distribution: str, data: DataConfig | None = None
) -> Iterable[str]:
    """The resolved configuration, for the console. `distribution`: the backend and how the step is
    distributed (e.g. "TensorFlow, MirroredStrategy with 2 replica(s)")."""
    yield f"model: {config.to_json()}"
    if data is not None:
        yield f"data: {json.dumps(dataclasses.asdict(data), sort_keys=True)}"
    yield f"training: {json.dumps(dataclasses.asdict(train_config), sort_keys=True)}"
    yield f"backend: {distribution}"
    if train_config.loss == "perceptual":
        yield describe_weights(train_config.vgg_weights)
    else:
        yield "loss: image-space L1 (eq. 4 baseline), no VGG"


_TRAIN_FLAGS_AS_GIVEN = (
    "batch_size", "learning_rate", "loss", "vgg_weights", "vgg_pooling", "strategy", "mixed_precision", "clip_norm",
    "checkpoint_every", "summary_every", "image_every", "keep_checkpoints", "init_from", "jit_compile", "remat",
    "inter_op_threads", "seed", "all_reduce_implementation", "all_reduce_pack_mb", "all_reduce_dtype",
)  # fmt: skip


def resolve_experiment(flags: Mapping) -> ExperimentConfig:
    """crn-train's flags (name -> value, as crn_tf.train defines them) -> the ExperimentConfig they mean.

    The preset fixes the architecture and the data's manifest the classes; epochs become steps through the
    split's example count. Raises ValueError naming the flag or file that is wrong.
    """
    from crn_tf import data  # deferred: tf.data only where a run is resolved

    f = dict(flags)
    for name in ("data_dir", "model_dir"):
        if not f.get(name):
            raise ValueError(f"--{name} is required")
    overrides = {}
    if f.get("num_outputs") is not None:
        overrides["num_outputs"] = f["num_outputs"]
    if f.get("upsampling") is not None:
        overrides["upsampling"] = f["upsampling"]
    if f.get("widths"):
        overrides["widths"] = tuple(int(w) for w in f["widths"].split(","))
    manifest = data.load_manifest(f["data_dir"], f["split"])
    # The preset fixes the architecture; the classes (and so the input channels) come from the data.
    space = data.manifest_label_space(manifest, data.manifest_path(f["data_dir"], f["split"]))
    config = get_preset(f["preset"], **overrides).with_label_space(space)
    size = parse_size(f.get("size"), "--size") or config.native_size
    steps_per_epoch = max(1, math.ceil(manifest["count"] / f["batch_size"]))
    if (f.get("steps") is None) == (f.get("epochs") is None):
        raise ValueError("give exactly one of --steps and --epochs")
    steps = f["steps"] if f.get("steps") is not None else int(math.ceil(f["epochs"] * steps_per_epoch))
    # The flags that are TrainConfig fields of the same name and meaning; the others are converted here.
    as_given = {name: f[name] for name in _TRAIN_FLAGS_AS_GIVEN}
    train_config = TrainConfig(
        **as_given,
        steps=steps,
        automatic_weights=f["layer_weights"] == "auto",
        rebalance_after=int(f["rebalance_after"] * steps_per_epoch),
        rebalance_window=steps_per_epoch,
        train_modules=parse_train_modules(f["train_modules"] or "", config.module_names),
    )
    data_config = DataConfig(
        data_dir=f["data_dir"],
        split=f["split"],
        size=size,
        examples=int(manifest["count"]),
        epochs=f.get("epochs"),
        sample_split=f.get("sample_split") or None,
        deterministic=bool(f.get("deterministic")),
    )
    check_loss_size(config, train_config, size)
    return ExperimentConfig(model=config, data=data_config, training=train_config, model_dir=f["model_dir"])
