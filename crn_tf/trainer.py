"""The trainer: a CascadedRefinementNetwork's training step and loop under a tf.distribute strategy, with
its state (model, optimizer, step, loss balancing, input position) in a CheckpointManager under model_dir.

A run started again with the same model_dir resumes (from the newest readable checkpoint); SIGTERM / Ctrl-C
save first; on a multi-worker cluster a SIGTERM on any worker makes all save the same step. The strategy and
the gradient all-reduce are crn_tf/distribution.py's, the TensorBoard scalars and sample grids
crn_tf/summaries.py's, the configs crn_tf/experiment.py's; `train_experiment` runs a whole ExperimentConfig.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels, summaries
from crn_tf.config import CRNConfig
from crn_tf.distribution import (
    all_reduce_gradients,
    configure_threads,
    is_chief,
    make_strategy,
    no_gradient_aggregation,
    task_id,
)
from crn_tf.experiment import (
    EXPERIMENT_FILENAME,
    FLAGS_FILENAME,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
    describe,
)
from crn_tf.lock import ModelDirLock
from crn_tf.losses import build_loss
from crn_tf.model import CascadedRefinementNetwork
from crn_tf.model_dir import (
    CHECKPOINT_PREFIX,
    CheckpointUnreadable,
    checkpoint_variable_names,
    checkpoints,
    init_from,
    load_config,
    restore_checkpoint,
    save_config,
)
from crn_tf.progress import Progress
from crn_tf.run_history import (  # noqa: F401 - the TRAIN_*_FILENAMEs: re-exported
    TRAIN_CONFIG_FILENAME,
    TRAIN_HISTORY_FILENAME,
    config_conflicts,
    delete_checkpoints,
    previous_train_config,
    record_run,
    set_aside_unreadable,
)


class _Preempted(Exception):
    """Raised by the PreemptionCheckpointHandler's exit_fn once every worker has saved."""


class TrainingDiverged(RuntimeError):
    """The loss, or a gradient the step would apply, became NaN or Inf."""


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
        data_config: what the run trains on, recorded in each history entry (train_experiment gives it).
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
        data_config: DataConfig | None = None,
    ):
        self.config = config
        self.train_config = tc = train_config
        self.model_dir = model_dir
        self.strategy = strategy or make_strategy(tc.strategy)
        self.log = log
        self.data_config = data_config
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
        directory = self.model_dir if self.chief else f"{self.model_dir}/.worker-tmp-{task_id(self.strategy)}"
        return tf.train.CheckpointManager(
            self.checkpoint,
            directory,
            max_to_keep=self.train_config.keep_checkpoints,
            checkpoint_name=CHECKPOINT_PREFIX,
        )

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
        previous = previous_train_config(self.model_dir)
        latest, notes = self._restore_newest_readable(previous)
        if self.chief:
            notes += record_run(
                self.model_dir, self.train_config, previous, latest, int(self.step.numpy()), self.data_config
            )
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
                notes.append(set_aside_unreadable(self.model_dir, found[:i], found[i:]))
                self.manager = self._make_manager()
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

    def _replica_step(self, batch):
        grads, terms = self._gradients_fn(batch)
        # The global gradient, the same on every replica: the step's only all-reduce of gradients.
        tc = self.train_config
        grads = all_reduce_gradients(grads, tc.all_reduce_dtype, tc.communication_options)
        if self.train_config.clip_norm:
            # Clip the summed gradient (not each replica's, which Keras' clipnorm would do). For
            # float16 the gradient is still scaled, so the threshold is scaled too.
            scale = self.optimizer.dynamic_scale if hasattr(self.optimizer, "dynamic_scale") else 1.0
            grads, _ = tf.clip_by_global_norm(grads, self.train_config.clip_norm * tf.cast(scale, tf.float32))
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads])  # per variable
        return grads, finite, terms

    def _replica_apply(self, grads):
        self.optimizer.apply(grads, self.model.trainable_variables)

    def train_step(self, iterator) -> tuple[dict, tf.Tensor, tf.Tensor]:
        """One optimizer step on the next global batch of `iterator` (a distributed dataset's iterator).

        Returns (loss terms summed over the replicas, per-variable finiteness of the summed gradient, whether
        the update was applied). The step function is traced on the first call; the benchmarks time this.
        """
        if self._step_fn is None:
            self._step_fn = self._build_step()
        return self._step_fn(iterator)

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
            tf.train.Checkpoint(), f"{self.model_dir}/.preemption-unused-{task_id(self.strategy)}", max_to_keep=1
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
        delete_checkpoints(kept - set(self.manager.checkpoints))  # the manager's glob may have missed them
        return path

    def train(self, dataset: tf.data.Dataset, steps: int | None = None, sample_batch: dict | None = None) -> dict:
        """Runs until `steps` (default train_config.steps) total steps; returns the last loss terms.

        `dataset` yields global batches forever (repeat()). `sample_batch` (a fixed batch, e.g. of
        validation pairs; default: the first training batch) is synthesized into
        model_dir/samples/step_<N>.png at each checkpoint and into TensorBoard every image_every steps.
        """
        tc = self.train_config
        steps = tc.steps if steps is None else steps
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
        progress = Progress(steps, start=start_step, per_update=tc.batch_size, label="step", log=self.log)
        terms = {}
        try:
            while int(self.step.numpy()) < steps and not self._stop_requested:
                try:
                    terms, finite, applied = run(self.train_step, iterator)
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
        tc = self.train_config
        summaries.write_scalars(
            self.writer, step, terms, self.loss, tc.learning_rate, tc.batch_size, progress.steps_per_second
        )

    def _write_images(self, step: int, batch: dict, png: bool = True, summary: bool = True) -> None:
        """The sample grid as model_dir/samples/step_<N>.png and/or a TensorBoard image."""
        if not self.chief:
            return
        grid = summaries.sample_grid(self.model, batch, self.label_space, self.config.num_outputs)
        summaries.write_sample_grid(
            grid,
            step,
            writer=self.writer if summary else None,
            samples_dir=f"{self.model_dir}/samples" if png else None,
        )


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train_experiment(experiment: ExperimentConfig, flags_text: str | None = None, log=print) -> dict:
    """Runs a whole experiment: the strategy, the sample batch, the Trainer (fresh or resumed), the seeded
    training stream at the checkpointed position, and the record in the model_dir. Returns the last loss terms.

    Args:
        experiment: the resolved run (crn_tf.experiment.resolve_experiment).
        flags_text: the crn-train flags that gave it, written to model_dir/flags.txt for `--flagfile`.
        log: where the configuration and progress lines go.
    """
    from crn_tf import data  # deferred: tf.data only where a run starts

    model, d, tc, model_dir = experiment.model, experiment.data, experiment.training, experiment.model_dir
    threads = configure_threads(tc.inter_op_threads)  # first: TensorFlow must not have started
    if d.deterministic:
        tf.config.experimental.enable_op_determinism()  # repeatable kernels (and a seeded input stream)
    strategy = make_strategy(tc.strategy)
    for line in describe(model, tc, strategy, d):
        log(line)
    log(threads)
    sample_batch = None  # a fixed batch of the sample split if the data has one, else the first training batch
    if d.sample_split and tf.io.gfile.exists(data.manifest_path(d.data_dir, d.sample_split)):
        samples = data.make_dataset(
            d.data_dir, d.sample_split, batch_size=min(4, tc.batch_size * 2), image_size=d.size, config=model,
            training=False,
        )  # fmt: skip
        sample_batch = next(iter(samples))
    trainer = Trainer(model, tc, model_dir, strategy=strategy, log=log, data_config=d)
    log(trainer.initialize())
    if trainer.chief:  # after initialize(): the lock is held and a conflicting model_dir was refused
        fileio.write_json(f"{model_dir}/{EXPERIMENT_FILENAME}", experiment.to_dict())
        if flags_text is not None:
            fileio.atomic_write(f"{model_dir}/{FLAGS_FILENAME}", flags_text)
    # The stream is a function of the seed; a resumed run continues at its checkpointed position.
    dataset = data.make_dataset(
        d.data_dir, d.split, batch_size=tc.batch_size, image_size=d.size, config=model, training=True, seed=tc.seed,
        position=trainer.input_position(),
    )  # fmt: skip
    terms = trainer.train(dataset, sample_batch=sample_batch)
    log(
        f"model_dir: {model_dir} (checkpoints, crn_config.json, {EXPERIMENT_FILENAME}, {FLAGS_FILENAME}, "
        "samples/, TensorBoard logs in train/)"
    )
    return terms
