"""The JAX trainer: `KERAS_BACKEND=jax crn-train ...` trains the same experiment as on TensorFlow.

One `jax.jit`-compiled step: the reference's VGG-19 features (no gradient), value and gradient of the
loss through `model.stateless_call`, clipping of the global gradient (`--clip_norm`), a finiteness
check (a non-finite gradient is not applied), `optimizer.stateless_apply`. The model's, optimizer's
and the frozen VGG-19's values are the step's arguments (VGG's and the loss's layer weights through a
`keras.StatelessScope`), not Python-side state: nothing per layer happens in the loop.

Data parallelism: `keras.distribution.DataParallel` over every device (all local accelerators, and
every process's when the job is started with Keras' multi-process variables
KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID, which `keras.distribution.initialize`
hands to `jax.distributed.initialize`). The weights are replicated, the global batch is sharded on its
first axis, and XLA's partitioner sums the gradient across devices in the compiled step. Each process
reads the same seeded stream and keeps its slice of every global batch.

Input: the same TFRecords through tf.data (TensorFlow installed for the input pipeline), converted to
NumPy at the step boundary. Checkpoints: TensorFlow's format with TensorFlow's CheckpointManager, under
the keys the TensorFlow trainer uses for the model, step, loss state and input position (crn_tf.api's
`tf_checkpoint_key`), so crn-export, crn-synthesize, crn-eval, crn-studio and `--init_from` read a
JAX-trained model_dir unchanged; Adam's state is saved under `jax_optimizer/`, which only this trainer
reads (a resume on the other backend starts the optimizer afresh and says so).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf

from crn_tf import labels
from crn_tf.api import find_variable_key, tf_checkpoint_key
from crn_tf.bundle import BundleReader
from crn_tf.config import CRNConfig
from crn_tf.experiment import DataConfig, ExperimentConfig, TrainConfig, describe
from crn_tf.model_dir import CHECKPOINT_PREFIX, CheckpointUnreadable, CheckpointValues, checkpoints, init_from
from crn_tf.run_history import delete_checkpoints
from crn_tf.training_loop import BaseTrainer, run_experiment

OPTIMIZER_KEY = "jax_optimizer"
# TrainConfig fields that only TensorFlow's distribution has: refused on JAX unless at their defaults.
_TENSORFLOW_ONLY = {
    "all_reduce_implementation": "auto",
    "all_reduce_pack_mb": 0.0,
    "all_reduce_dtype": None,
    "inter_op_threads": None,
}


def check_train_config(tc: TrainConfig) -> None:
    """Refuses what the JAX trainer does not do, naming the flag."""
    for name, default in _TENSORFLOW_ONLY.items():
        if getattr(tc, name) != default:
            raise ValueError(f"--{name} is an option of TensorFlow's distribution; unset it with KERAS_BACKEND=jax")
    if tc.mixed_precision == "float16":
        raise ValueError(
            "--mixed_precision=float16 needs loss scaling, which the JAX step does not do: use "
            "--mixed_precision=bfloat16 (same speed on GPUs and TPUs, float32's range)"
        )


def make_distribution(strategy: str = "auto"):
    """The Keras distribution for `--strategy` on JAX (None: one device).

    `auto`: every device of every process (several processes when KERAS_DISTRIBUTION_* say so);
    `mirrored`: this process's devices; `multi_worker`: as auto, but the job must have several
    processes; `one_device`: the first device.
    """
    import jax

    if _multi_process_requested() and not jax.distributed.is_initialized():
        # CPU processes exchange through gloo (GPUs and TPUs through their own collectives); a JAX
        # without the option keeps its default.
        with contextlib.suppress(AttributeError, ValueError):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize()  # jax.distributed.initialize from KERAS_DISTRIBUTION_*
    if strategy == "multi_worker" and jax.process_count() < 2:
        raise ValueError(
            "--strategy=multi_worker on JAX needs KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES "
            "and KERAS_DISTRIBUTION_PROCESS_ID (one process per host; see the README)"
        )
    devices = {"mirrored": jax.local_devices(), "one_device": jax.local_devices()[:1]}.get(strategy, jax.devices())
    if len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices)


def _multi_process_requested() -> bool:
    import os

    return int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1) > 1


def describe_distribution(distribution) -> str:
    import jax

    if distribution is None:
        return f"jax {jax.__version__}, one device ({jax.local_devices()[0].device_kind})"
    devices = distribution.device_mesh.devices.size
    return (
        f"jax {jax.__version__}, keras.distribution.DataParallel over {devices} devices in "
        f"{jax.process_count()} process(es) ({jax.local_devices()[0].device_kind})"
    )


class JaxTrainer(BaseTrainer):
    """Trains a CascadedRefinementNetwork on the JAX backend; the loop is BaseTrainer's.

    Args:
        config, train_config, model_dir, label_space, log, data_config: as crn_tf.trainer.Trainer's.
        distribution: a keras.distribution.DataParallel, or None for one device (make_distribution).
    """

    backend = "jax"

    def __init__(
        self,
        config: CRNConfig,
        train_config: TrainConfig,
        model_dir: str,
        label_space: labels.LabelSpace | None = None,
        log=print,
        data_config: DataConfig | None = None,
        distribution=None,
    ):
        import jax

        if keras.backend.backend() != "jax":
            raise ValueError(f"JaxTrainer needs KERAS_BACKEND=jax (Keras runs on {keras.backend.backend()})")
        check_train_config(train_config)
        tc = train_config
        self.distribution = distribution
        super().__init__(
            config, tc, model_dir, chief=jax.process_index() == 0, label_space=label_space, log=log,
            data_config=data_config,
        )  # fmt: skip
        scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
        with self._building(), scope:  # variables made here are replicated on every device
            self._build_model_and_loss()
            self.optimizer = keras.optimizers.Adam(learning_rate=tc.learning_rate)
            self._prepare_training()
        devices = distribution.device_mesh.devices.size if distribution is not None else 1
        if tc.batch_size % devices:
            raise ValueError(f"--batch_size={tc.batch_size} must be a multiple of the {devices} devices")
        self._step = 0
        self._input = (0, 0, tc.batch_size)  # position, anchor step, batch size
        self._state = None  # (trainable, non-trainable, optimizer) values while training; see _sync
        self._step_fn = None
        self._mirror = None  # key -> tf.Variable: what the CheckpointManager writes
        self.manager = None
        self.writer = tf.summary.create_file_writer(f"{model_dir}/train") if self.chief else None
        self._data_sharding = None
        if distribution is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            mesh = distribution.device_mesh.backend_mesh
            self._data_sharding = NamedSharding(mesh, PartitionSpec(distribution.batch_dim_name))

    # ---- the backend half of BaseTrainer ----
    def current_step(self) -> int:
        return self._step

    def latest_checkpoint(self) -> str | None:
        if self.manager is not None:
            return self.manager.latest_checkpoint
        found = checkpoints(self.model_dir)
        return found[0] if found else None

    def _input_anchor(self) -> tuple[int, int, int]:
        return self._input

    def _set_input_anchor(self, position: int, step: int, batch_size: int) -> None:
        self._input = (int(position), int(step), int(batch_size))

    def _init_from(self, source: str):
        return init_from(self.model, source)

    def _checkpoints_changed(self) -> None:
        self.manager = None  # made again on the next save, from the rewritten state file

    def _restore(self, prefix: str, keep_optimizer: bool, previous: dict | None) -> list[str]:
        values = CheckpointValues(prefix)  # TensorFlow's reader: checksums checked
        try:
            # Keys through the object graph: the TensorFlow trainer's checkpoints name the model's
            # tensors by the optimizer's path to them.
            graph = BundleReader(prefix)

            def get(path: str):
                key = graph.variable_key(path)
                if key is None:
                    raise CheckpointUnreadable(f"checkpoint {prefix} has no value for {path}")
                return values.get(key)

            found = {}
            for v in self.model.weights:
                key = find_variable_key(graph, v.path)
                if key is None:
                    raise CheckpointUnreadable(f"checkpoint {prefix} has no value for {v.path}")
                found[v.path] = values.get(key)
            step = int(get("step"))
            loss_state = {n: get(f"loss_state/{n}") for n in _LOSS_STATE}
            has_input = graph.variable_key("input/position") is not None
            inputs = tuple(int(get(f"input/{n}")) for n in _INPUT) if has_input else (0, 0, 0)
            optimizer = {}
            if keep_optimizer:
                for v in self.optimizer.variables:
                    if graph.variable_key(f"{OPTIMIZER_KEY}/{v.path}") is None:
                        optimizer = None
                        break
                    optimizer[v.path] = get(f"{OPTIMIZER_KEY}/{v.path}")
        except ValueError as e:  # the index or object graph did not read (BundleReader)
            if isinstance(e, CheckpointUnreadable):
                raise
            raise CheckpointUnreadable(f"checkpoint {prefix} is unreadable: {e}") from e
        finally:
            values.close()
        for v in self.model.weights:
            v.assign(found[v.path])
        for name, value in loss_state.items():
            getattr(self.loss, name).assign(value)
        self._step = step
        # Checkpoints from before the input position was saved: it counts from the step (see initialize).
        self._input = inputs if has_input else (0, 0, self.train_config.batch_size)
        notes = []
        if optimizer:
            for v in self.optimizer.variables:
                v.assign(optimizer[v.path])
        elif keep_optimizer:
            notes.append(f"{prefix} holds no JAX optimizer state: Adam's moments started afresh")
        self._state = None
        return notes

    def _iterator(self, dataset):
        """Global batches as device arrays, sharded on the batch axis over the devices (this process
        keeps its slice of each global batch: every process reads the same seeded stream)."""
        import jax

        processes, index = jax.process_count(), jax.process_index()
        for batch in dataset.as_numpy_iterator():
            batch = {k: batch[k] for k in ("layout", "image")}
            if self._data_sharding is None:
                yield {k: jax.device_put(v) for k, v in batch.items()}
                continue
            if processes > 1:
                share = len(batch["layout"]) // processes
                batch = {k: v[index * share : (index + 1) * share] for k, v in batch.items()}
            yield {k: jax.make_array_from_process_local_data(self._data_sharding, v) for k, v in batch.items()}

    # ---- the step ----
    def _values(self):
        if self._state is None:
            self._state = (
                [v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables],
                [v.value for v in self.optimizer.variables],
            )
        return self._state

    def _sync(self) -> None:
        """Writes the step's values back into the Keras variables (before they are read: saves, samples)."""
        if self._state is None:
            return
        trainable, non_trainable, optimizer = self._state
        for variables, values in (
            (self.model.trainable_variables, trainable),
            (self.model.non_trainable_variables, non_trainable),
            (self.optimizer.variables, optimizer),
        ):
            for v, value in zip(variables, values):
                v.assign(value)

    def _build_step(self):
        import jax
        import jax.numpy as jnp

        model, loss, optimizer, tc = self.model, self.loss, self.optimizer, self.train_config
        frozen = (loss.feature_extractor.weights if loss.feature_extractor is not None else []) + [loss.layer_weights]

        def step(trainable, non_trainable, optimizer_state, frozen_values, layout, image):
            # The frozen VGG-19 and the loss's layer weights are arguments (mapped onto their variables),
            # so that rebalancing reaches the compiled step and no weight is a traced constant.
            with keras.StatelessScope(state_mapping=list(zip(frozen, frozen_values))):
                real_features = [jax.lax.stop_gradient(f) for f in loss.features(image)]

                def mean_loss(trainable):
                    fake, new_non_trainable = model.stateless_call(trainable, non_trainable, layout, training=True)
                    terms = loss(image, fake, layout, real_features=real_features)  # per example [B]
                    # The mean over the global batch: with the batch sharded, XLA sums the devices' gradients.
                    return jnp.mean(terms["total"]), (terms, new_non_trainable)

                (_, (terms, non_trainable)), grads = jax.value_and_grad(mean_loss, has_aux=True)(trainable)
            if tc.clip_norm:  # the global gradient's norm (the devices' sum), as on TensorFlow
                norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))
                scale = jnp.minimum(1.0, tc.clip_norm / jnp.maximum(norm, 1e-12))
                grads = [g * scale.astype(g.dtype) for g in grads]
            finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads])
            new_trainable, new_optimizer = optimizer.stateless_apply(optimizer_state, grads, trainable)
            applied = jnp.all(finite)  # a non-finite gradient is not applied (the loop stops on it)
            new_trainable = [jnp.where(applied, n, o) for n, o in zip(new_trainable, trainable)]
            new_optimizer = [jnp.where(applied, n, o) for n, o in zip(new_optimizer, optimizer_state)]
            means = {k: jnp.mean(v) for k, v in terms.items()}
            return new_trainable, non_trainable, new_optimizer, means, finite, applied

        return jax.jit(step, donate_argnums=(0, 1, 2)), frozen

    def train_step(self, iterator):
        """One optimizer step on the next global batch of `iterator` (`_iterator`'s): (loss terms, the
        per-variable finiteness of the gradient, whether the update was applied)."""
        if self._step_fn is None:
            self._step_fn = self._build_step()
        step_fn, frozen = self._step_fn
        batch = next(iterator)
        trainable, non_trainable, optimizer_state = self._values()
        frozen_values = [v.value for v in frozen]
        trainable, non_trainable, optimizer_state, terms, finite, applied = step_fn(
            trainable, non_trainable, optimizer_state, frozen_values, batch["layout"], batch["image"]
        )
        self._state = (trainable, non_trainable, optimizer_state)
        applied = bool(_host(applied))
        self._step += int(applied)
        return {k: float(_host(v)) for k, v in terms.items()}, _host(finite), applied

    def _stop_agreed(self) -> bool:
        """Every process stops at the same step: a signal seen by any one of them stops all (each step's
        collectives need every process)."""
        import jax

        if jax.process_count() == 1:
            return self._stop_requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._stop_requested))))

    # ---- checkpoints ----
    def _checkpoint_values(self) -> dict:
        """key -> NumPy value of everything a checkpoint holds (after _sync)."""
        values = {tf_checkpoint_key(v.path): _host(v.value) for v in self.model.weights}
        values["step"] = np.int64(self._step)
        for name in _LOSS_STATE:
            values[f"loss_state/{name}"] = _host(getattr(self.loss, name).value)
        for name, value in zip(_INPUT, self._input):
            values[f"input/{name}"] = np.int64(value)
        for v in self.optimizer.variables:
            values[f"{OPTIMIZER_KEY}/{v.path}"] = _host(v.value)
        return values

    def _manager(self, values: dict) -> tf.train.CheckpointManager:
        """The CheckpointManager over TensorFlow variables that mirror the checkpoint (made on first use),
        holding `values`."""
        if self.manager is None:
            with tf.device("/cpu:0"):
                self._mirror = {k: tf.Variable(v, trainable=False) for k, v in values.items()}
            directory = self.model_dir if self.chief else f"{self.model_dir}/.worker-tmp-{_process_index()}"
            self.manager = tf.train.CheckpointManager(
                _checkpoint_tree(self._mirror), directory, max_to_keep=self.train_config.keep_checkpoints,
                checkpoint_name=CHECKPOINT_PREFIX,
            )  # fmt: skip
        else:
            for key, value in values.items():
                self._mirror[key].assign(value)
        return self.manager

    def save(self) -> str | None:
        if not self.chief:  # the values are replicated: the chief's checkpoint is everyone's
            return None
        self._sync()
        manager = self._manager(self._checkpoint_values())  # one copy of the values off the devices
        kept = set(manager.checkpoints)
        path = manager.save(checkpoint_number=self._step)
        delete_checkpoints(kept - set(manager.checkpoints))  # the manager's glob may have missed them
        return path

    def _write_images(self, step: int, batch: dict, png: bool = True, summary: bool = True) -> None:
        if not self.chief:
            return
        from crn_tf import summaries

        # The chief's own copy of the (replicated) weights: a computation on the global arrays would
        # need every process to take part.
        trainable, non_trainable, _ = self._values()
        local = ([_host(v) for v in trainable], [_host(v) for v in non_trainable])

        def predict(layout, training=False):
            return self.model.stateless_call(*local, layout, training=training)[0]

        grid = summaries.sample_grid(predict, batch, self.label_space, self.config.num_outputs)
        summaries.write_sample_grid(
            grid, step, writer=self.writer if summary else None,
            samples_dir=f"{self.model_dir}/samples" if png else None,
        )  # fmt: skip

    def close(self) -> None:
        self._sync()
        super().close()


_LOSS_STATE = ("layer_weights", "term_sums", "term_count", "rebalanced")
_INPUT = ("position", "anchor_step", "batch_size")


def _host(value) -> np.ndarray:
    """A (replicated) device array as NumPy: this process's copy."""
    if hasattr(value, "addressable_data") and not getattr(value, "is_fully_addressable", True):
        value = value.addressable_data(0)
    return np.asarray(value)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _checkpoint_tree(mirror: dict) -> tf.train.Checkpoint:
    """Nested tf.train.Checkpoint objects whose attribute paths are the keys: `model/head/conv/bias`
    is saved as `model/head/conv/bias/.ATTRIBUTES/VARIABLE_VALUE`, as the TensorFlow trainer's is."""
    root: dict = {}
    for key, variable in mirror.items():
        node = root
        *parents, name = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = variable

    def build(node):
        return tf.train.Checkpoint(**{k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(root)


def compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache, unless the user set one (JAX_COMPILATION_CACHE_DIR):
    `$XDG_CACHE_HOME/crn_tf/jax` (default ~/.cache/crn_tf/jax). A run started again (a resume, the
    next experiment of the same shape) then skips compiling the step and the initializers. Returns a
    line for the log."""
    import os

    import jax

    if jax.config.jax_compilation_cache_dir:
        return f"JAX compilation cache: {jax.config.jax_compilation_cache_dir}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(cache, "crn_tf", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return f"JAX compilation cache: {directory} (set JAX_COMPILATION_CACHE_DIR to move it)"


def train_experiment(experiment: ExperimentConfig, flags_text: str | None = None, log=print) -> dict:
    """crn_tf.trainer.train_experiment on JAX: the distribution, then the shared run_experiment."""
    d, tc = experiment.data, experiment.training
    check_train_config(tc)
    cache = compilation_cache()
    if d.deterministic:
        tf.config.experimental.enable_op_determinism()  # the input pipeline's kernels
    distribution = make_distribution(tc.strategy)
    header = [*describe(experiment.model, tc, describe_distribution(distribution), d), cache]
    if tc.jit_compile:
        header.append("--jit_compile: the JAX step is always compiled (jax.jit)")

    def make_trainer():
        return JaxTrainer(experiment.model, tc, experiment.model_dir, log=log, data_config=d, distribution=distribution)

    return run_experiment(experiment, make_trainer, header, flags_text, log)
