"""Training: a `Trainer` (custom loop under a tf.distribute strategy) and the `crn-train` CLI.

    crn-train --preset=tiny --data_dir=/tmp/crn_data --model_dir=/tmp/crn_tiny --steps=300 --vgg_weights=none
    # ~2 min on 2 CPU cores; the paper's 256p model: crn-train --preset=cityscapes_256p ... (one 24+ GB GPU)

The same code runs on one CPU, N GPUs (MirroredStrategy) and N machines (MultiWorkerMirroredStrategy
from TF_CONFIG). State (model, optimizer, step, loss balancing) lives in a CheckpointManager under
model_dir; a run started again with the same model_dir resumes; SIGTERM / Ctrl-C save first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels
from crn_tf.config import CRNConfig, parse_size
from crn_tf.lock import ModelDirLock
from crn_tf.losses import LOSS_KINDS, build_loss
from crn_tf.model import (
    CHECKPOINT_PREFIX,
    CascadedRefinementNetwork,
    CheckpointUnreadable,
    checkpoint_files,
    checkpoint_variable_names,
    checkpoints,
    load_config,
    load_model,
    restore_checkpoint,
    save_config,
)
from crn_tf.vgg import describe_weights

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
ALL_REDUCE_IMPLEMENTATIONS = ("auto", "ring", "nccl")
TRAIN_CONFIG_FILENAME = "train_config.json"  # the latest run's TrainConfig
TRAIN_HISTORY_FILENAME = "train_config_history.json"  # every run's: when, from which checkpoint, what changed


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
        remat: recompute activations in the backward pass (tf.recompute_grad per refinement module and
            per VGG-19 block) instead of keeping them: less memory, more time; the same gradients.
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


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """`auto`: MultiWorkerMirroredStrategy if TF_CONFIG names several workers, else MirroredStrategy
    over all local GPUs if there are several, else the default (one-device) strategy."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        if len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def no_gradient_aggregation(optimizer: keras.optimizers.Optimizer) -> None:
    """Makes `optimizer.apply` use the gradients it is given as they are, without summing them over replicas.

    The Trainer sums each gradient over the replicas once itself (to clip the sum and check it before
    the update, and to pass CommunicationOptions). Keras 3's TensorFlow optimizer would all-reduce them
    again inside apply() whenever it runs in a replica context (TFOptimizer._all_reduce_sum_gradients in
    keras/src/backend/tensorflow/optimizer.py, 3.15), and it offers no option to skip that (Keras 2's
    `experimental_aggregate_gradients=False` is gone); calling apply() from a cross-replica context
    instead fails on CPUs and without XLA, where it needs a merge_call. So this replaces that one
    method on the instance (on the inner optimizer of a LossScaleOptimizer, which does the update).
    tests/test_train.py counts the elements all-reduced per step, so a Keras that changes this fails there.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not callable(getattr(inner, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(
            f"Keras {keras.__version__}: {type(inner).__name__} has no _all_reduce_sum_gradients; "
            "crn_tf.train.no_gradient_aggregation needs updating for this Keras version"
        )
    inner._all_reduce_sum_gradients = list  # (gradient, variable) pairs through unchanged


class _Preempted(Exception):
    """Raised by the PreemptionCheckpointHandler's exit_fn once every worker has saved."""


class TrainingDiverged(RuntimeError):
    """The loss, or a gradient the step would apply, became NaN or Inf."""


def config_conflicts(saved: CRNConfig, wanted: CRNConfig) -> list[str]:
    """The fields on which two model configs differ, as readable strings."""
    a, b = saved.to_dict(), wanted.to_dict()
    # Label spaces compare by content: a model_dir from before configs recorded their classes names a
    # built-in space, which equals the same space recorded in full.
    conflicts = [
        f"{k}: saved {a[k]!r}, requested {b[k]!r}"
        for k in sorted(a)
        if a[k] != b[k] and k not in ("name", *_SPACE_KEYS)
    ]
    try:
        same_space = saved.get_label_space() == wanted.get_label_space()
    except ValueError:  # an old config naming a palette JSON that is gone
        same_space = all(a[k] == b[k] for k in _SPACE_KEYS)
    if not same_space:
        conflicts.append(
            f"label space: saved {a['label_space']!r} ({a['num_classes']} classes), requested {b['label_space']!r} "
            f"({b['num_classes']} classes)"
        )
    return conflicts


_SPACE_KEYS = ("label_space", "classes")


class Trainer:
    """Trains a CascadedRefinementNetwork on batches {"layout": [B,H,W,C+1], "image": [B,H,W,3]}.

    Args:
        config: the generator's CRNConfig.
        train_config: how to train.
        model_dir: where checkpoints, configs, summaries and sample images go.
        strategy: a tf.distribute strategy (default: make_strategy(train_config.strategy)).
        label_space: for colourising layouts in image summaries (default: the config's).
        log: where progress lines go.
        make_optimizer: a function returning the optimizer (default: Adam at train_config's
            learning rate); called inside the strategy scope.
    """

    def __init__(
        self,
        config: CRNConfig,
        train_config: TrainConfig,
        model_dir: str,
        strategy: tf.distribute.Strategy | None = None,
        label_space: labels.LabelSpace | None = None,
        log=print,
        make_optimizer=None,
    ):
        self.config = config
        self.train_config = tc = train_config
        self.model_dir = model_dir
        self.strategy = strategy or make_strategy(tc.strategy)
        self.log = log
        self.chief = is_chief(self.strategy)
        self.label_space = label_space or config.get_label_space()
        # The paper's automatic layer weights: asked for, or the preset has no fixed ones.
        self.automatic_weights = tc.automatic_weights or config.layer_weights is None
        self._check_model_dir()
        # One writer per model_dir: the chief holds its lock from here to close() or the process's end.
        self.lock = ModelDirLock(model_dir) if self.chief else None
        if self.lock is not None:
            self.lock.acquire(log=log)

        previous_policy = keras.mixed_precision.global_policy()
        if tc.mixed_precision:
            keras.mixed_precision.set_global_policy(f"mixed_{tc.mixed_precision}")
        try:
            keras.utils.set_random_seed(tc.seed)
            # Everything with state is created inside the strategy scope, and the optimizer is built
            # before the first tf.function step (otherwise its slots are created inside the trace).
            with self.strategy.scope():
                self.model = CascadedRefinementNetwork(config)
                self.loss = build_loss(
                    config,
                    kind=tc.loss,
                    vgg_weights=tc.vgg_weights,
                    vgg_pooling=tc.vgg_pooling,
                    automatic_weights=self.automatic_weights,
                )
                self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
                if make_optimizer is None:
                    optimizer = keras.optimizers.Adam(learning_rate=tc.learning_rate)
                else:
                    optimizer = make_optimizer()
                if tc.mixed_precision == "float16":
                    optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
                self.optimizer = optimizer
                no_gradient_aggregation(optimizer)
                self.frozen = self._freeze_modules(tc.train_modules)
                self.model.remat = tc.remat
                if self.loss.feature_extractor is not None:
                    self.loss.feature_extractor.remat = tc.remat
                self.optimizer.build(self.model.trainable_variables)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

        self._loss_state = loss_state = tf.train.Checkpoint(
            layer_weights=self.loss.layer_weights,
            term_sums=self.loss.term_sums,
            term_count=self.loss.term_count,
            rebalanced=self.loss.rebalanced,
        )
        # The input position: examples of the (seeded) training stream consumed at `step`, kept as an
        # anchor (position at anchor_step, batch size since) so that the step function need not update it.
        self.input_state = tf.train.Checkpoint(
            position=tf.Variable(0, dtype=tf.int64, trainable=False, name="input_position"),
            anchor_step=tf.Variable(0, dtype=tf.int64, trainable=False, name="input_anchor_step"),
            batch_size=tf.Variable(tc.batch_size, dtype=tf.int64, trainable=False, name="input_batch_size"),
        )
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step, loss_state=loss_state, input=self.input_state
        )
        self.manager = self._make_manager()
        self.global_batch_size = tc.batch_size
        self._step_fn = None
        self._preemption = None  # a PreemptionCheckpointHandler on multi-worker clusters, made by train()
        self._stop_requested = False
        self.writer = tf.summary.create_file_writer(f"{model_dir}/train") if self.chief else None

    # ---- set-up ----
    def _make_manager(self) -> tf.train.CheckpointManager:
        directory = self.model_dir if self.chief else f"{self.model_dir}/.worker-tmp-{self._task_id()}"
        return tf.train.CheckpointManager(
            self.checkpoint,
            directory,
            max_to_keep=self.train_config.keep_checkpoints,
            checkpoint_name=CHECKPOINT_PREFIX,
        )

    def _task_id(self) -> int:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        return int(resolver.task_id) if resolver is not None and resolver.task_id is not None else 0

    def _check_model_dir(self) -> None:
        """Refuses to resume a model_dir whose saved model config conflicts with this one."""
        path = f"{self.model_dir}/crn_config.json"
        if tf.io.gfile.exists(path):
            conflicts = config_conflicts(load_config(self.model_dir), self.config)
            if conflicts:
                raise ValueError(
                    f"{self.model_dir} holds a model with another configuration ({'; '.join(conflicts)}). "
                    "Resume it with the same preset and overrides, or train into a new --model_dir "
                    "(use --init_from to start from it)."
                )

    def _freeze_modules(self, names: Sequence[str] | None) -> list[str]:
        """Marks every module not in `names` non-trainable; returns the frozen names."""
        if not names:
            return []
        known = list(self.model.module_names) + ["head"]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"--train_modules: unknown module(s) {unknown}; this model has {known}")
        frozen = []
        for name in known:
            if name not in names:
                getattr(self.model, name).trainable = False
                frozen.append(name)
        return frozen

    def initialize(self) -> str:
        """Restores the latest checkpoint of model_dir, or starts fresh (from init_from if given).

        Returns a line saying what happened.
        """
        previous = self._previous_train_config()
        latest, notes = self._restore_newest_readable(previous)
        if self.chief:
            notes += self._record_train_config(previous, latest)
        if latest:
            # Re-anchor the input position at this step (and batch size): the step function need not update it.
            position = self.input_position()
            self.input_state.position.assign(position)
            self.input_state.anchor_step.assign(self.step)
            self.input_state.batch_size.assign(self.train_config.batch_size)
            message = f"resumed from {latest} at step {int(self.step.numpy())}"
            if self.train_config.init_from:
                message += " (--init_from ignored: this model_dir already has checkpoints)"
            return "; ".join([message, *notes])
        if self.chief:
            save_config(self.config, self.model_dir)
        if self.train_config.init_from:
            copied, skipped = init_from(self.model, self.train_config.init_from)
            return f"initialised from {self.train_config.init_from}: copied {copied}" + (
                f"; kept fresh (not in the source or other shapes): {skipped}" if skipped else ""
            )
        return "starting from scratch"

    def input_position(self) -> int:
        """Examples of the training stream consumed at the current step (make_dataset's `position`)."""
        state = self.input_state
        return int(state.position + (self.step - state.anchor_step) * state.batch_size)

    def close(self) -> None:
        """Flushes the summaries and gives the model_dir's lock back (also done when the process ends)."""
        if self.writer is not None:
            self.writer.flush()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- resuming ----
    def _previous_train_config(self) -> dict | None:
        """The training config of the run that wrote this model_dir's checkpoints (the history's last)."""
        history = f"{self.model_dir}/{TRAIN_HISTORY_FILENAME}"
        if tf.io.gfile.exists(history):
            entries = fileio.read_json(history)
            return entries[-1]["train_config"] if entries else None
        path = f"{self.model_dir}/{TRAIN_CONFIG_FILENAME}"  # model_dirs from before the history
        return fileio.read_json(path) if tf.io.gfile.exists(path) else None

    def _restore_newest_readable(self, previous: dict | None) -> tuple[str | None, list[str]]:
        """Restores the newest checkpoint that reads, skipping (and moving aside) unreadable ones.

        Returns the checkpoint restored (None: there is none) and lines saying what was skipped.
        If --train_modules changed, the optimizer's state (per trainable variable) is not restored.
        """
        notes = []
        saved_modules = (previous or {}).get("train_modules")
        saved_modules = tuple(saved_modules) if saved_modules else None
        # Adam's slots belong to the previously trained variables: restoring them onto another set
        # fails, or silently mixes them up where shapes agree. Keep model, step, loss and input state only.
        keep_optimizer = previous is None or saved_modules == self.train_config.train_modules
        found = checkpoints(self.model_dir)
        for i, prefix in enumerate(found):
            parts = dict(model=self.model, step=self.step, loss_state=self._loss_state)
            if keep_optimizer:
                parts["optimizer"] = self.optimizer
            try:
                # Checkpoints from before the input position was saved: it counts from the step (see initialize).
                if any(name.startswith("input/") for name in checkpoint_variable_names(prefix)):
                    parts["input"] = self.input_state
                restore_checkpoint(tf.train.Checkpoint(**parts), prefix, partial=not keep_optimizer)
            except CheckpointUnreadable as e:
                notes.append(f"skipped {e}")
                continue
            if i and self.chief:
                notes.append(self._set_aside(found[:i], found[i:]))
            if not keep_optimizer:
                notes.append(
                    f"--train_modules changed ({list(saved_modules or ['all'])} -> "
                    f"{list(self.train_config.train_modules or ['all'])}): model, step and loss state restored, "
                    "optimizer state started afresh"
                )
            return prefix, notes
        if found:
            raise CheckpointUnreadable(f"{self.model_dir}: no readable checkpoint; " + "; ".join(notes))
        return None, notes

    def _set_aside(self, unreadable: list[str], readable: list[str]) -> str:
        """Renames unreadable checkpoints' files to *.unreadable (kept, not deleted) and makes the
        newest readable one the latest, so that the manager neither resumes from nor rotates by them."""
        for prefix in unreadable:
            for path in checkpoint_files(prefix):
                if tf.io.gfile.exists(path):
                    tf.io.gfile.rename(path, path + ".unreadable", overwrite=True)
        state = tf.train.get_checkpoint_state(self.model_dir)
        stamps = dict(zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)) if state else {}
        oldest_first = list(reversed(readable))
        # With timestamps: a CheckpointManager pairs paths with them and drops paths that have none.
        tf.compat.v1.train.update_checkpoint_state(
            self.model_dir,
            readable[0],
            all_model_checkpoint_paths=oldest_first,
            all_model_checkpoint_timestamps=[stamps.get(p, time.time()) for p in oldest_first],
        )
        self.manager = self._make_manager()
        return f"moved the unreadable checkpoint files aside (*.unreadable): {', '.join(unreadable)}"

    def _record_train_config(self, previous: dict | None, resumed_from: str | None) -> list[str]:
        """Appends this run's training config to the history; returns a line naming what changed."""
        current = json.loads(json.dumps(dataclasses.asdict(self.train_config)))  # tuples as JSON lists
        changed = {}
        if previous is not None and resumed_from:
            for key in sorted(set(previous) | set(current)):
                if previous.get(key) != current.get(key):
                    changed[key] = [previous.get(key), current.get(key)]
        path = f"{self.model_dir}/{TRAIN_HISTORY_FILENAME}"
        history = fileio.read_json(path) if tf.io.gfile.exists(path) else []
        history.append(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "resumed_from": resumed_from,
                "step": int(self.step.numpy()),
                "changed": changed,
                "train_config": current,
            }
        )
        tf.io.gfile.makedirs(self.model_dir)
        fileio.write_json(path, history)
        fileio.write_json(f"{self.model_dir}/{TRAIN_CONFIG_FILENAME}", current)  # the latest run's
        if not changed:
            return []
        return ["changed since the last run: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())]

    # ---- the step ----
    # One step: each replica computes its gradient (the part --jit_compile compiles), the replicas
    # sum it in ONE all-reduce (_all_reduce_gradients), clip it and check it is finite; then, in the
    # cross-replica context, the optimizer applies it only if finite (float16: the loss scale
    # optimizer decides). Keras' optimizer would all-reduce the gradients a second time inside
    # apply(); no_gradient_aggregation switches that off.
    def _replica_gradients(self, batch):
        layout, image = batch["layout"], batch["image"]
        # The reference's VGG features need no gradient: computed before the tape records anything.
        real_features = [tf.stop_gradient(f) for f in self.loss.features(tf.cast(image, tf.float32))]
        with tf.GradientTape() as tape:
            fake = self.model(layout, training=True)
            terms = self.loss(image, fake, layout, real_features=real_features)  # per example [B_replica]
            # Average over the *global* batch: summing replicas' gradients then gives the mean.
            loss = tf.nn.compute_average_loss(terms["total"], global_batch_size=self.global_batch_size)
            scaled = self.optimizer.scale_loss(loss)  # loss * dynamic scale for float16, else loss
        grads = tape.gradient(scaled, self.model.trainable_variables)
        return grads, {k: tf.reduce_sum(v) / self.global_batch_size for k, v in terms.items()}

    def _all_reduce_gradients(self, grads):
        """The cross-replica sum of `grads`: the step's only all-reduce of gradients."""
        ctx = tf.distribute.get_replica_context()
        if ctx.num_replicas_in_sync == 1:  # nothing to sum (and no reason to round to the wire dtype)
            return grads
        wire = self.train_config.all_reduce_dtype
        if wire:  # reduced precision on the wire only: the sum is cast back before clipping and the update
            dtypes = [g.dtype for g in grads]
            grads = [tf.cast(g, wire) for g in grads]
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads, options=self.train_config.communication_options)
        if wire:
            grads = [tf.cast(g, d) for g, d in zip(grads, dtypes)]
        return grads

    def _replica_step(self, batch):
        grads, terms = self._gradients_fn(batch)
        grads = self._all_reduce_gradients(grads)  # the global gradient, the same on every replica
        if self.train_config.clip_norm:
            # Clip the summed gradient (not each replica's, which Keras' clipnorm would do). For
            # float16 the gradient is still scaled, so the threshold is scaled too.
            scale = self.optimizer.dynamic_scale if hasattr(self.optimizer, "dynamic_scale") else 1.0
            grads, _ = tf.clip_by_global_norm(grads, self.train_config.clip_norm * tf.cast(scale, tf.float32))
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads])  # per variable
        return grads, finite, terms

    def _replica_apply(self, grads):
        self.optimizer.apply(grads, self.model.trainable_variables)

    def _build_step(self):
        self._gradients_fn = self._replica_gradients
        if self.train_config.jit_compile:  # XLA compiles the replica's forward and backward, not the collectives
            self._gradients_fn = tf.function(self._replica_gradients, jit_compile=True)
        loss_scaling = isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer)
        strategy = self.strategy

        @tf.function
        def step_fn(iterator):
            batch = next(iterator)
            grads, finite, terms = strategy.run(self._replica_step, args=(batch,))
            # Every replica checked the same summed gradient: the first local result speaks for all.
            finite = strategy.experimental_local_results(finite)[0]
            if loss_scaling:
                # LossScaleOptimizer skips a non-finite step itself and lowers the loss scale.
                strategy.run(self._replica_apply, args=(grads,))
                applied = tf.constant(True)
            else:

                def apply():
                    strategy.run(self._replica_apply, args=(grads,))
                    return tf.constant(True)

                applied = tf.cond(tf.reduce_all(finite), apply, lambda: tf.constant(False))
            self.step.assign_add(tf.cast(applied, tf.int64))
            terms = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in terms.items()}
            return terms, finite, applied

        return step_fn

    def _check_finite(self, step: int, terms: dict, finite: np.ndarray, applied: bool) -> None:
        """Stops the run (nothing saved) on a non-finite loss, or a non-finite gradient the step did not apply."""
        loss_ok = math.isfinite(terms["total"])
        if loss_ok and applied:
            return
        problem = f"loss is {terms['total']} at step {step}" if not loss_ok else f"at step {step}"
        if not applied:
            names = [v.path for v, ok in zip(self.model.trainable_variables, finite) if not ok]
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            problem += (
                f"{',' if not loss_ok else ''} the gradient is not finite (NaN/Inf in {shown}): weights not updated"
            )
        raise TrainingDiverged(
            f"{problem}; stopped without saving. The last good checkpoint is {self.manager.latest_checkpoint}. "
            "Try a lower --learning_rate or --clip_norm."
        )

    # ---- the loop ----
    def _make_preemption_handler(self):
        """On a multi-worker cluster, TF's PreemptionCheckpointHandler: a SIGTERM on any worker makes
        every worker save at the same step (through self.save) and stop, so all resume from one checkpoint.

        The handler would restore from the CheckpointManager it is given and add its run counter to that
        checkpoint; initialize() has restored ours already (skipping unreadable ones), so it gets an empty
        checkpoint in a directory nothing writes, and saves through save_fn. None elsewhere (a single
        process saves on SIGTERM by itself, see _request_stop).
        """
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or not resolver.cluster_spec().jobs:
            return None
        unused = tf.train.CheckpointManager(
            tf.train.Checkpoint(), f"{self.model_dir}/.preemption-unused-{self._task_id()}", max_to_keep=1
        )

        def preempted():
            raise _Preempted

        config = tf.distribute.experimental.TerminationConfig(exit_fn=preempted, save_fn=self.save)
        return tf.distribute.experimental.PreemptionCheckpointHandler(resolver, unused, termination_config=config)

    def _request_stop(self, signum, frame):
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.log(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint, then stopping")

    def save(self) -> str | None:
        kept = set(self.manager.checkpoints)
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:  # non-chief workers write to a scratch dir (collectives need every worker)
            tf.io.gfile.rmtree(self.manager.directory)
            return None
        # The manager deletes the checkpoints it rotates out by glob, which matches nothing when the
        # model_dir's name has glob characters (`run[1]/` kept them all): delete them by name too.
        for dropped in kept - set(self.manager.checkpoints):
            for file in checkpoint_files(dropped):
                if tf.io.gfile.exists(file):
                    tf.io.gfile.remove(file)
        return path

    def train(self, dataset: tf.data.Dataset, steps: int | None = None, sample_batch: dict | None = None) -> dict:
        """Runs until `steps` (default train_config.steps) total steps; returns the last loss terms.

        `dataset` yields global batches forever (repeat()). `sample_batch` (a fixed batch, e.g. of
        validation pairs; default: the first training batch) is synthesized into
        model_dir/samples/step_<N>.png at each checkpoint and into TensorBoard every image_every steps.
        """
        tc = self.train_config
        steps = tc.steps if steps is None else steps
        if self._step_fn is None:
            self._step_fn = self._build_step()
        if sample_batch is None:
            sample_batch = next(iter(dataset))
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        handlers = {}
        if threading_main():
            handlers[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
            if self._preemption is None:
                self._preemption = self._make_preemption_handler()  # installs its own SIGTERM handler
            for sig in (signal.SIGINT,) if self._preemption else (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._request_stop)
        run = self._preemption.run if self._preemption else lambda fn, *args: fn(*args)
        start_step = int(self.step.numpy())
        progress = Progress(start_step, steps, tc.batch_size, self.log)
        terms = {}
        try:
            while int(self.step.numpy()) < steps and not self._stop_requested:
                try:
                    terms, finite, applied = run(self._step_fn, iterator)
                except _Preempted:
                    self.log(
                        f"\npreempted (SIGTERM on a worker): every worker saved step {int(self.step.numpy())} "
                        f"({self.manager.latest_checkpoint if self.chief else 'on the chief'}) and stopped; "
                        "start them again to resume"
                    )
                    return terms
                terms = {k: float(v) for k, v in terms.items()}
                step = int(self.step.numpy())
                self._check_finite(step if bool(applied) else step + 1, terms, finite.numpy(), bool(applied))
                if self.automatic_weights and tc.rebalance_after and not bool(self.loss.rebalanced.numpy()):
                    if step > tc.rebalance_after - tc.rebalance_window:
                        self.loss.accumulate(terms)
                    if step >= tc.rebalance_after:
                        self.loss.rebalance()
                        weights = ", ".join(f"{w:.4g}" for w in self.loss.layer_weights.numpy())
                        self.log(f"\nstep {step}: layer weights rebalanced to [{weights}]")
                progress.update(step, terms)
                if self.writer is not None and step % tc.summary_every == 0:
                    self._write_scalars(step, terms, progress)
                if step % tc.image_every == 0 and self.writer is not None:
                    self._write_images(step, sample_batch, png=False)
                if step % tc.checkpoint_every == 0:
                    self.save()
                    self._write_images(step, sample_batch, summary=False)
            final = int(self.step.numpy())
            if self.manager.latest_checkpoint is None or not self.manager.latest_checkpoint.endswith(f"-{final}"):
                self.save()
            if final > start_step and final % tc.checkpoint_every:
                self._write_images(final, sample_batch, summary=False)
            progress.finish(final)
            return terms
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.flush()

    # ---- summaries ----
    def _write_scalars(self, step: int, terms: dict, progress: Progress) -> None:
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss/total", terms["total"])
            for name, value in terms.items():
                if name != "total":
                    tf.summary.scalar(f"loss_terms/{name}", value)
            for name, weight in zip(self.loss.layer_names, self.loss.layer_weights.numpy()):
                tf.summary.scalar(f"layer_weights/{name}", weight)
            tf.summary.scalar("learning_rate", float(self.train_config.learning_rate))
            tf.summary.scalar("speed/steps_per_second", progress.steps_per_second)
            tf.summary.scalar("speed/images_per_second", progress.steps_per_second * self.train_config.batch_size)

    def _write_images(self, step: int, batch: dict, png: bool = True, summary: bool = True) -> None:
        """The sample grid as model_dir/samples/step_<N>.png and/or a TensorBoard image."""
        if not self.chief:
            return
        grid = sample_grid(self.model, batch, self.label_space, self.config.num_outputs)
        if summary and self.writer is not None:
            with self.writer.as_default(step=step):
                tf.summary.image("layout | synthesized | reference", grid[None].astype(np.float32) / 255.0)
        if png:
            tf.io.gfile.makedirs(f"{self.model_dir}/samples")
            fileio.atomic_write(f"{self.model_dir}/samples/step_{step:08d}.png", tf.io.encode_png(grid).numpy())


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def colorize_layout(layout, label_space: labels.LabelSpace) -> np.ndarray:
    """One-hot [N, H, W, C+1] -> colour layouts uint8 [N, H, W, 3] (void black)."""
    ids = np.argmax(np.asarray(layout), axis=-1)
    ids = np.where(ids >= label_space.num_classes, labels.VOID_ID, ids).astype(np.uint8)
    return label_space.color_table()[ids]


def sample_grid(model, batch: dict, label_space: labels.LabelSpace, num_outputs: int, max_rows: int = 4) -> np.ndarray:
    """uint8 [rows * H, (k + 2) * W, 3]: per example, layout | k synthesized images | reference."""
    layout = batch["layout"][:max_rows]
    fake = np.clip(np.asarray(model(layout, training=False), np.float32), 0, 255).round().astype(np.uint8)
    columns = [colorize_layout(layout, label_space)]
    columns += [fake[..., 3 * u : 3 * u + 3] for u in range(num_outputs)]
    columns.append(np.clip(np.asarray(batch["image"][:max_rows]), 0, 255).round().astype(np.uint8))
    rows = np.concatenate(columns, axis=2)  # [N, H, (k+2) W, 3]
    return np.concatenate(list(rows), axis=0)


class Progress:
    """A one-line progress bar with loss terms and images/s (plain lines when not on a terminal)."""

    def __init__(self, start: int, total: int, batch_size: int, log=print, every: int | None = None):
        self.start, self.total, self.batch_size, self.log = start, total, batch_size, log
        self.tty = sys.stdout.isatty()
        self.every = every or (1 if self.tty else max(1, (total - start) // 20))
        self.t0 = time.perf_counter()
        self.last_time, self.last_step = self.t0, start
        self.steps_per_second = 0.0

    def update(self, step: int, terms: dict) -> None:
        now = time.perf_counter()
        if step > self.last_step:
            self.steps_per_second = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        if (step - self.start) % self.every and step != self.total:
            return
        done = (step - self.start) / max(self.total - self.start, 1)
        bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        detail = " ".join(f"{k}={v:.4g}" for k, v in terms.items() if k != "total")
        line = (
            f"[{bar}] step {step}/{self.total} loss={terms['total']:.4g} ({detail}) "
            f"{rate * self.batch_size:.2f} img/s, eta {eta:.0f}s"
        )
        self.log("\r" + line if self.tty else line, **({"end": "", "flush": True} if self.tty else {}))

    def finish(self, step: int) -> None:
        if self.tty:
            self.log("")
        elapsed = time.perf_counter() - self.t0
        self.log(f"done: step {step}, {step - self.start} steps in {elapsed:.1f}s")


def init_from(model: CascadedRefinementNetwork, source: str) -> tuple[list[str], list[str]]:
    """Copies every weight of every module (and the head) that `source` shares with `model` by name and shape.

    `source` is a model_dir, a checkpoint prefix in one, or a .keras file. Across label spaces the first
    convolution of each module sees other input channels and stays fresh; the rest is copied. Returns
    (copied: modules copied whole, or "name (kept fresh: ...)" for partly copied ones; skipped: modules
    kept fresh whole).
    """
    try:
        other = load_model(source)
    except ValueError as e:
        raise ValueError(f"--init_from={source}: {e}") from e
    copied, skipped = [], []
    for name in list(model.module_names) + ["head"]:
        if not hasattr(other, name):
            skipped.append(name)
            continue
        theirs = {_within(w, name): w for w in getattr(other, name).weights}
        ours = getattr(model, name).weights
        fresh = []
        for w in ours:
            src = theirs.get(_within(w, name))
            if src is None or tuple(src.shape) != tuple(w.shape):
                fresh.append(
                    f"{_within(w, name)} {tuple(w.shape)}" + ("" if src is None else f" vs {tuple(src.shape)}")
                )
            else:
                w.assign(src)
        if not fresh:
            copied.append(name)
        elif len(fresh) == len(ours):
            skipped.append(name)
        else:
            copied.append(f"{name} (kept fresh: {', '.join(fresh)})")
    if not copied:
        raise ValueError(f"--init_from={source}: shares no module with this model ({list(model.module_names)})")
    return copied, skipped


def _within(variable, module: str) -> str:
    """A variable's path inside its module: `conv1/kernel`."""
    return variable.path.split(f"{module}/", 1)[-1]


def check_loss_size(config: CRNConfig, train_config: TrainConfig, size: Sequence[int]) -> None:
    """Refuses a training size too small for a VGG-19 layer the perceptual loss weights (after p poolings
    a layer needs 2^p pixels per side; below that its term is the mean of nothing: NaN)."""
    from crn_tf.config import LOSS_LAYERS
    from crn_tf.vgg import POOLS_BEFORE

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


def describe(config: CRNConfig, train_config: TrainConfig, strategy: tf.distribute.Strategy) -> Iterable[str]:
    """The resolved configuration, for the console."""
    yield f"model: {config.to_json()}"
    yield f"training: {json.dumps(dataclasses.asdict(train_config), sort_keys=True)}"
    yield f"strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"
    if train_config.loss == "perceptual":
        yield describe_weights(train_config.vgg_weights)
    else:
        yield "loss: image-space L1 (eq. 4 baseline), no VGG"


# ---- crn-train CLI ------------------------------------------------------------------------------


def define_flags() -> None:
    from absl import flags

    from crn_tf.config import PRESETS

    flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "Model preset (crn_tf/config.py).")
    flags.DEFINE_integer("num_outputs", None, "Override the preset's k (images per layout).")
    flags.DEFINE_enum("upsampling", None, ["align_corners", "half_pixel"], "Override the upsampling mode.")
    flags.DEFINE_string("widths", None, "Override the module widths, comma-separated, coarsest first.")
    flags.DEFINE_string("data_dir", None, "Directory of TFRecord shards + {split}.json (crn-convert).")
    flags.DEFINE_string("split", "train", "Split to train on.")
    flags.DEFINE_string("size", None, "Training size HxW (default: the preset's native size).")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, summaries and samples go.")
    flags.DEFINE_integer("batch_size", 1, "Global batch size.")
    flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate.")
    flags.DEFINE_integer("steps", None, "Total training steps (or use --epochs).")
    flags.DEFINE_float("epochs", None, "Total epochs over the split (needs its manifest count).")
    flags.DEFINE_enum("loss", "perceptual", list(LOSS_KINDS), "perceptual (paper) or image (eq. 4 baseline).")
    flags.DEFINE_enum("layer_weights", "preset", ["preset", "auto"], "Preset's fixed weights or the paper's.")
    flags.DEFINE_float("rebalance_after", 100, "Epochs after which automatic layer weights are rebalanced.")
    flags.DEFINE_string("vgg_weights", "imagenet", "imagenet (Keras, downloaded once), none, or a weights file.")
    flags.DEFINE_enum("vgg_pooling", "avg", ["avg", "max"], "avg (the original) or max.")
    flags.DEFINE_enum("strategy", "auto", list(STRATEGIES), "Distribution strategy.")
    flags.DEFINE_enum("mixed_precision", None, ["float16", "bfloat16"], "Mixed precision compute dtype.")
    flags.DEFINE_float("clip_norm", None, "Clip the global gradient norm (after the cross-replica sum).")
    flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")
    flags.DEFINE_integer("summary_every", 50, "Steps between TensorBoard scalars.")
    flags.DEFINE_integer("image_every", 500, "Steps between TensorBoard image grids.")
    flags.DEFINE_string("sample_split", "val", "Split whose first batch is drawn at each checkpoint (if present).")
    flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints to keep.")
    flags.DEFINE_string("init_from", None, "model_dir or checkpoint to initialise shared modules from.")
    flags.DEFINE_string("train_modules", "", "Modules to train: n (the n highest + head) or names.")
    flags.DEFINE_boolean("jit_compile", False, "XLA-compile the replica step (GPUs).")
    flags.DEFINE_boolean("remat", False, "Recompute activations in the backward pass: less memory, more time.")
    flags.DEFINE_integer("seed", 0, "Random seed (initialisation and the order of the training data).")
    flags.DEFINE_boolean("deterministic", False, "Deterministic ops (enable_op_determinism): a repeatable run.")
    flags.DEFINE_enum(
        "all_reduce_implementation", "auto", list(ALL_REDUCE_IMPLEMENTATIONS), "Gradient all-reduce: auto, ring, nccl."
    )
    flags.DEFINE_float("all_reduce_pack_mb", 0, "Pack gradients into all-reduces of ~this many MiB (0: TF decides).")
    flags.DEFINE_enum("all_reduce_dtype", None, ["bfloat16", "float16"], "Send gradients in this dtype (half traffic).")
    flags.mark_flags_as_required(["data_dir", "model_dir"])


def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fileio.quiet_absl_logging()
    try:
        train_from_flags()
    except (ValueError, TrainingDiverged) as e:  # bad flags, data or model_dir: a message, not a traceback
        sys.exit(f"crn-train: {e}")


def train_from_flags() -> None:
    """crn-train's body: flags -> CRNConfig, TrainConfig, dataset -> Trainer.train."""
    from absl import flags

    from crn_tf import data
    from crn_tf.config import get_preset

    f = flags.FLAGS
    overrides = {}
    if f.num_outputs is not None:
        overrides["num_outputs"] = f.num_outputs
    if f.upsampling is not None:
        overrides["upsampling"] = f.upsampling
    if f.widths:
        overrides["widths"] = tuple(int(w) for w in f.widths.split(","))
    manifest = data.load_manifest(f.data_dir, f.split)
    # The preset fixes the architecture; the classes (and so the input channels) come from the data.
    space = data.manifest_label_space(manifest, data.manifest_path(f.data_dir, f.split))
    config = get_preset(f.preset, **overrides).with_label_space(space)
    size = parse_size(f.size, "--size") or config.native_size
    steps_per_epoch = max(1, math.ceil(manifest["count"] / f.batch_size))
    if (f.steps is None) == (f.epochs is None):
        raise ValueError("give exactly one of --steps and --epochs")
    steps = f.steps if f.steps is not None else int(math.ceil(f.epochs * steps_per_epoch))
    train_config = TrainConfig(
        batch_size=f.batch_size,
        learning_rate=f.learning_rate,
        steps=steps,
        loss=f.loss,
        automatic_weights=f.layer_weights == "auto",
        rebalance_after=int(f.rebalance_after * steps_per_epoch),
        rebalance_window=steps_per_epoch,
        vgg_weights=f.vgg_weights,
        vgg_pooling=f.vgg_pooling,
        strategy=f.strategy,
        mixed_precision=f.mixed_precision,
        clip_norm=f.clip_norm,
        checkpoint_every=f.checkpoint_every,
        summary_every=f.summary_every,
        image_every=f.image_every,
        keep_checkpoints=f.keep_checkpoints,
        init_from=f.init_from,
        train_modules=parse_train_modules(f.train_modules, config.module_names),
        jit_compile=f.jit_compile,
        remat=f.remat,
        seed=f.seed,
        all_reduce_implementation=f.all_reduce_implementation,
        all_reduce_pack_mb=f.all_reduce_pack_mb,
        all_reduce_dtype=f.all_reduce_dtype,
    )
    if f.deterministic:
        tf.config.experimental.enable_op_determinism()  # repeatable kernels (and a seeded input stream)
    check_loss_size(config, train_config, size)
    strategy = make_strategy(train_config.strategy)
    for line in describe(config, train_config, strategy):
        print(line)
    sample_batch = None  # a fixed batch of the sample split if the data has one, else the first training batch
    if f.sample_split and tf.io.gfile.exists(data.manifest_path(f.data_dir, f.sample_split)):
        samples = data.make_dataset(
            f.data_dir,
            f.sample_split,
            batch_size=min(4, f.batch_size * 2),
            image_size=size,
            config=config,
            training=False,
        )
        sample_batch = next(iter(samples))
    trainer = Trainer(config, train_config, f.model_dir, strategy=strategy)
    print(trainer.initialize())
    # The stream is a function of the seed; a resumed run continues at its checkpointed position.
    dataset = data.make_dataset(
        f.data_dir, f.split, batch_size=f.batch_size, image_size=size, config=config, training=True, seed=f.seed,
        position=trainer.input_position(),
    )  # fmt: skip
    trainer.train(dataset, sample_batch=sample_batch)
    print(f"model_dir: {f.model_dir} (checkpoints, crn_config.json, samples/, TensorBoard logs in train/)")


def run() -> None:
    """Console entry point of crn-train."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
