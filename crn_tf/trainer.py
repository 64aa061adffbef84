"""The TensorFlow trainer: a CascadedRefinementNetwork's training step under a tf.distribute strategy, with
its state (model, optimizer, step, loss balancing, input position) in a CheckpointManager under model_dir.

The loop, resume, signals, summaries and run history are crn_tf/training_loop.py's (the same on every
backend); this module adds the step (tf.function, GradientTape, one all-reduce), the strategy and the
checkpoint objects. On a multi-worker cluster a SIGTERM on any worker makes all save the same step. The
strategy and the gradient all-reduce are crn_tf/distribution.py's, the configs crn_tf/experiment.py's;
`train_experiment` runs a whole ExperimentConfig on the current Keras backend (crn_tf/jax_trainer.py on JAX).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from crn_tf import labels, tf_ops
from crn_tf.config import CRNConfig
from crn_tf.distribution import (
    all_reduce_gradients,
    configure_threads,
    is_chief,
    make_strategy,
    no_gradient_aggregation,
    task_id,
)
from crn_tf.experiment import DataConfig, ExperimentConfig, TrainConfig, describe
from crn_tf.model_dir import (
    CHECKPOINT_PREFIX,
    checkpoint_variable_names,
    init_from,
    restore_checkpoint,
)
from crn_tf.run_history import (  # noqa: F401 - the TRAIN_*_FILENAMEs and config_conflicts: re-exported
    TRAIN_CONFIG_FILENAME,
    TRAIN_HISTORY_FILENAME,
    config_conflicts,
    delete_checkpoints,
)
from crn_tf.training_loop import (  # noqa: F401 - threading_main, TrainingDiverged: re-exported
    BaseTrainer,
    Preempted,
    TrainingDiverged,
    run_experiment,
    threading_main,
)


class Trainer(BaseTrainer):
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

    backend = "tensorflow"

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
        tc = train_config
        self.strategy = strategy or make_strategy(tc.strategy)
        super().__init__(
            config,
            tc,
            model_dir,
            chief=is_chief(self.strategy),
            label_space=label_space,
            log=log,
            data_config=data_config,
        )

        # Everything with state is created inside the strategy scope, and the optimizer is built
        # before the first tf.function step (otherwise its slots are created inside the trace).
        with self._building(), self.strategy.scope():
            self._build_model_and_loss()
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            if make_optimizer is None:
                optimizer = keras.optimizers.Adam(learning_rate=tc.learning_rate)
            else:
                optimizer = make_optimizer()
            if tc.mixed_precision == "float16":
                optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            no_gradient_aggregation(optimizer)
            self._prepare_training()

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

    # ---- the backend half of BaseTrainer ----
    def current_step(self) -> int:
        return int(self.step.numpy())

    def latest_checkpoint(self) -> str | None:
        return self.manager.latest_checkpoint

    def _input_anchor(self) -> tuple[int, int, int]:
        state = self.input_state
        return int(state.position.numpy()), int(state.anchor_step.numpy()), int(state.batch_size.numpy())

    def _set_input_anchor(self, position: int, step: int, batch_size: int) -> None:
        self.input_state.position.assign(position)
        self.input_state.anchor_step.assign(step)
        self.input_state.batch_size.assign(batch_size)

    def _init_from(self, source: str):
        return init_from(self.model, source)

    def _checkpoints_changed(self) -> None:
        self.manager = self._make_manager()

    def _restore(self, prefix: str, keep_optimizer: bool, previous: dict | None) -> list[str]:
        parts = dict(model=self.model, step=self.step, loss_state=self._loss_state)
        if keep_optimizer:
            parts["optimizer"] = self.optimizer
        # Checkpoints from before the input position was saved: it counts from the step (see initialize).
        if any(name.startswith("input/") for name in checkpoint_variable_names(prefix)):
            parts["input"] = self.input_state
        restore_checkpoint(tf.train.Checkpoint(**parts), prefix, partial=not keep_optimizer)
        return []

    def _iterator(self, dataset):
        return iter(self.strategy.experimental_distribute_dataset(dataset))

    def _preemption_runner(self):
        if self._preemption is None:
            self._preemption = self._make_preemption_handler()
        return self._preemption.run if self._preemption else None

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
            raise Preempted

        config = tf.distribute.experimental.TerminationConfig(exit_fn=preempted, save_fn=self.save)
        return tf.distribute.experimental.PreemptionCheckpointHandler(resolver, unused, termination_config=config)

    def save(self) -> str | None:
        kept = set(self.manager.checkpoints)
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:  # non-chief workers write to a scratch dir (collectives need every worker)
            tf.io.gfile.rmtree(self.manager.directory)
            return None
        delete_checkpoints(kept - set(self.manager.checkpoints))  # the manager's glob may have missed them
        return path


def train_experiment(experiment: ExperimentConfig, flags_text: str | None = None, log=print) -> dict:
    """Runs a whole experiment on the current Keras backend: the trainer (fresh or resumed), the seeded
    training stream at the checkpointed position, and the record in the model_dir (run_experiment).
    Returns the last loss terms. On TensorFlow: inter-op threads, op determinism, the strategy and
    `Trainer`; on JAX: crn_tf.jax_trainer.

    Args:
        experiment: the resolved run (crn_tf.experiment.resolve_experiment).
        flags_text: the crn-train flags that gave it, written to model_dir/flags.txt for `--flagfile`.
        log: where the configuration and progress lines go.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        from crn_tf import jax_trainer  # deferred: imports JAX

        return jax_trainer.train_experiment(experiment, flags_text, log)
    if backend != "tensorflow":
        raise ValueError(f"KERAS_BACKEND={backend}: crn-train trains on tensorflow or jax")
    d, tc = experiment.data, experiment.training
    threads = configure_threads(tc.inter_op_threads)  # first: TensorFlow must not have started
    if d.deterministic:
        tf.config.experimental.enable_op_determinism()  # repeatable kernels (and a seeded input stream)
    strategy = make_strategy(tc.strategy)
    distribution = f"tensorflow, {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"
    header = [*describe(experiment.model, tc, distribution, d), threads, tf_ops.describe_convolutions()]

    def make_trainer():
        return Trainer(experiment.model, tc, experiment.model_dir, strategy=strategy, log=log, data_config=d)

    return run_experiment(experiment, make_trainer, header, flags_text, log)
