"""What training does the same on every Keras backend: the loop, and everything around the step.

`BaseTrainer` owns the model_dir's lock, the model-config check, the resume (newest readable
checkpoint first, unreadable ones set aside, the optimizer state kept only where it fits), the run
history, `--init_from`, the input position, the loop (progress line, automatic layer-weight
rebalancing, non-finite checks, TensorBoard scalars and sample grids, checkpoints every N steps and
at the end, SIGTERM / Ctrl-C save-and-stop). A backend's trainer adds only the step mechanics and
the distribution: `crn_tf.trainer.Trainer` (TensorFlow: tf.function, GradientTape, tf.distribute)
and `crn_tf.jax_trainer.JaxTrainer` (JAX: jax.jit over stateless_call, keras.distribution).

Checkpoints are TensorFlow's format on both backends (`ckpt-<step>` with the model under `model/`,
as crn_tf.model_dir reads it), so every tool reads a model_dir whichever backend trained it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Sequence

import keras
import numpy as np

from crn_tf import labels, summaries
from crn_tf.config import CRNConfig
from crn_tf.experiment import DataConfig, TrainConfig
from crn_tf.lock import ModelDirLock
from crn_tf.losses import build_loss
from crn_tf.model import CascadedRefinementNetwork
from crn_tf.model_dir import CheckpointUnreadable, checkpoints, load_config, save_config
from crn_tf.progress import Progress
from crn_tf.run_history import config_conflicts, previous_run, record_run, set_aside_unreadable


class Preempted(Exception):
    """Raised by a backend's preemption handler once every worker has saved."""


class TrainingDiverged(RuntimeError):
    """The loss, or a gradient the step would apply, became NaN or Inf."""


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


class BaseTrainer:
    """The backend-independent half of a trainer (see the module docstring).

    A subclass builds `self.model` (a CascadedRefinementNetwork) and `self.loss` (a CRNLoss) and
    implements the methods marked "backend" below.
    """

    backend = "?"

    def __init__(
        self,
        config: CRNConfig,
        train_config: TrainConfig,
        model_dir: str,
        chief: bool,
        label_space: labels.LabelSpace | None = None,
        log=print,
        data_config: DataConfig | None = None,
    ):
        self.config = config
        self.train_config = train_config
        self.model_dir = model_dir
        self.log = log
        self.data_config = data_config
        self.chief = chief
        self.label_space = label_space or config.get_label_space()
        # The paper's automatic layer weights: asked for, or the preset has no fixed ones.
        self.automatic_weights = train_config.automatic_weights or config.layer_weights is None
        self._check_model_dir()
        # One writer per model_dir: the chief holds its lock from here to close() or the process's end.
        self.lock = ModelDirLock(model_dir) if chief else None
        if self.lock is not None:
            self.lock.acquire(log=log)
        self._stop_requested = False
        self.writer = None  # the chief's TensorBoard writer, made by the subclass

    # ---- backend ----
    def current_step(self) -> int:
        raise NotImplementedError

    def train_step(self, iterator):
        """One optimizer step on the next global batch: (loss terms, per-variable finiteness of the
        gradient, whether the update was applied)."""
        raise NotImplementedError

    def save(self) -> str | None:
        raise NotImplementedError

    def latest_checkpoint(self) -> str | None:
        raise NotImplementedError

    def _restore(self, prefix: str, keep_optimizer: bool, previous: dict | None) -> list[str]:
        """Restores model, step, loss state, input position (and the optimizer if `keep_optimizer`)
        from `prefix`; raises CheckpointUnreadable. Returns lines to log."""
        raise NotImplementedError

    def _checkpoints_changed(self) -> None:
        """Unreadable checkpoints were set aside: the subclass's checkpoint manager must forget them."""

    def _input_anchor(self) -> tuple[int, int, int]:
        """(position, anchor step, batch size): examples consumed at the anchor step, batch size since."""
        raise NotImplementedError

    def _set_input_anchor(self, position: int, step: int, batch_size: int) -> None:
        raise NotImplementedError

    def _init_from(self, source: str) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def _iterator(self, dataset):
        """An iterator over the global batches of `dataset` that train_step takes."""
        raise NotImplementedError

    def _stop_agreed(self) -> bool:
        """Whether to stop before the next step (a signal was seen; a multi-process backend asks all)."""
        return self._stop_requested

    def _preemption_runner(self):
        """A multi-worker preemption handler's `run`, or None (SIGTERM is then handled here)."""
        return None

    # ---- set-up ----
    @contextlib.contextmanager
    def _building(self):
        """While the trainer's state is made: the run's mixed-precision policy (set back afterwards)
        and its seed (the same initial weights for the same --seed)."""
        previous_policy = keras.mixed_precision.global_policy()
        if self.train_config.mixed_precision:
            keras.mixed_precision.set_global_policy(f"mixed_{self.train_config.mixed_precision}")
        try:
            keras.utils.set_random_seed(self.train_config.seed)
            yield
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _build_model_and_loss(self) -> None:
        """The generator and the loss (inside `_building` and the backend's distribution scope)."""
        tc = self.train_config
        self.model = CascadedRefinementNetwork(self.config)
        self.loss = build_loss(
            self.config, kind=tc.loss, vgg_weights=tc.vgg_weights, vgg_pooling=tc.vgg_pooling,
            automatic_weights=self.automatic_weights,
        )  # fmt: skip

    def _prepare_training(self) -> None:
        """--train_modules and --remat on the model and loss, then the optimizer's slots for the trainable
        variables (self.optimizer made by the subclass)."""
        tc = self.train_config
        self.frozen = self._freeze_modules(tc.train_modules)
        self.model.remat = tc.remat
        if self.loss.feature_extractor is not None:
            self.loss.feature_extractor.remat = tc.remat
        self.optimizer.build(self.model.trainable_variables)

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

    def _check_model_dir(self) -> None:
        """Refuses to resume a model_dir whose saved model config conflicts with this one."""
        import tensorflow as tf  # tf.io.gfile: model_dirs may be gs:// paths

        if tf.io.gfile.exists(f"{self.model_dir}/crn_config.json"):
            conflicts = config_conflicts(load_config(self.model_dir), self.config)
            if conflicts:
                raise ValueError(
                    f"{self.model_dir} holds a model with another configuration ({'; '.join(conflicts)}). "
                    "Resume it with the same preset and overrides, or train into a new --model_dir "
                    "(use --init_from to start from it)."
                )

    def initialize(self) -> str:
        """Restores the latest checkpoint of model_dir, or starts fresh (from init_from if given).

        Returns a line saying what happened.
        """
        previous, previous_backend = previous_run(self.model_dir)
        latest, notes = self._restore_newest_readable(previous, previous_backend)
        if self.chief:
            notes += record_run(
                self.model_dir,
                self.train_config,
                previous,
                latest,
                self.current_step(),
                self.data_config,
                backend=self.backend,
            )
        if latest:
            # Re-anchor the input position at this step (and batch size): the step function need not update it.
            self._set_input_anchor(self.input_position(), self.current_step(), self.train_config.batch_size)
            message = f"resumed from {latest} at step {self.current_step()}"
            if self.train_config.init_from:
                message += " (--init_from ignored: this model_dir already has checkpoints)"
            return "; ".join([message, *notes])
        if self.chief:
            save_config(self.config, self.model_dir)
        if self.train_config.init_from:
            copied, skipped = self._init_from(self.train_config.init_from)
            return f"initialised from {self.train_config.init_from}: copied {copied}" + (
                f"; kept fresh (not in the source or other shapes): {skipped}" if skipped else ""
            )
        return "starting from scratch"

    def input_position(self) -> int:
        """Examples of the training stream consumed at the current step (make_dataset's `position`)."""
        position, anchor_step, batch_size = self._input_anchor()
        return int(position + (self.current_step() - anchor_step) * batch_size)

    def close(self) -> None:
        """Flushes the summaries and gives the model_dir's lock back (also done when the process ends)."""
        if self.writer is not None:
            self.writer.flush()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _restore_newest_readable(self, previous: dict | None, previous_backend: str) -> tuple[str | None, list[str]]:
        """Restores the newest checkpoint that reads, skipping (and moving aside) unreadable ones.

        Returns the checkpoint restored (None: there is none) and lines saying what was skipped. The
        optimizer's state is restored only if it belongs to the same trainable variables (--train_modules
        unchanged) and was written by this backend.
        """
        notes = []
        saved_modules = (previous or {}).get("train_modules")
        saved_modules = tuple(saved_modules) if saved_modules else None
        # Adam's slots belong to the previously trained variables: restoring them onto another set
        # fails, or silently mixes them up where shapes agree. Keep model, step, loss and input state only.
        same_modules = previous is None or saved_modules == self.train_config.train_modules
        same_backend = previous is None or previous_backend == self.backend
        keep_optimizer = same_modules and same_backend
        found = checkpoints(self.model_dir)
        for i, prefix in enumerate(found):
            try:
                restored_notes = self._restore(prefix, keep_optimizer, previous)
            except CheckpointUnreadable as e:
                notes.append(f"skipped {e}")
                continue
            if i and self.chief:
                notes.append(set_aside_unreadable(self.model_dir, found[:i], found[i:]))
                self._checkpoints_changed()
            if not same_modules:
                notes.append(
                    f"--train_modules changed ({list(saved_modules or ['all'])} -> "
                    f"{list(self.train_config.train_modules or ['all'])}): model, step and loss state restored, "
                    "optimizer state started afresh"
                )
            elif not same_backend:
                notes.append(
                    f"the checkpoint was written by the {previous_backend} backend and this run is on {self.backend}: "
                    "model, step, loss state and input position restored; the optimizer state (Adam's moments) "
                    "started afresh, since each backend's optimizer keeps it in its own layout"
                )
            return prefix, notes + restored_notes
        if found:
            raise CheckpointUnreadable(f"{self.model_dir}: no readable checkpoint; " + "; ".join(notes))
        return None, notes

    # ---- the loop ----
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
            f"{problem}; stopped without saving. The last good checkpoint is {self.latest_checkpoint()}. "
            "Try a lower --learning_rate or --clip_norm."
        )

    def _request_stop(self, signum, frame):
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.log(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint, then stopping")

    def train(self, dataset, steps: int | None = None, sample_batch: dict | None = None) -> dict:
        """Runs until `steps` (default train_config.steps) total steps; returns the last loss terms.

        `dataset` (a tf.data.Dataset) yields global batches forever (repeat()). `sample_batch` (a fixed
        batch, e.g. of validation pairs; default: the first training batch) is synthesized into
        model_dir/samples/step_<N>.png at each checkpoint and into TensorBoard every image_every steps.
        """
        tc = self.train_config
        steps = tc.steps if steps is None else steps
        if sample_batch is None:
            sample_batch = next(iter(dataset))
        sample_batch = {k: np.asarray(v) for k, v in sample_batch.items()}
        iterator = self._iterator(dataset)
        handlers = {}
        preemption = None
        if threading_main():
            handlers[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
            preemption = self._preemption_runner()  # installs its own SIGTERM handler
            for sig in (signal.SIGINT,) if preemption else (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._request_stop)
        run = preemption or (lambda fn, *args: fn(*args))
        start_step = self.current_step()
        progress = Progress(steps, start=start_step, per_update=tc.batch_size, label="step", log=self.log)
        terms = {}
        try:
            while self.current_step() < steps and not self._stop_agreed():
                try:
                    terms, finite, applied = run(self.train_step, iterator)
                except Preempted:
                    self.log(
                        f"\npreempted (SIGTERM on a worker): every worker saved step {self.current_step()} "
                        f"({self.latest_checkpoint() if self.chief else 'on the chief'}) and stopped; "
                        "start them again to resume"
                    )
                    return terms
                terms = {k: float(v) for k, v in terms.items()}
                step = self.current_step()
                applied = bool(applied)
                self._check_finite(step if applied else step + 1, terms, np.asarray(finite), applied)
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
            final = self.current_step()
            latest = self.latest_checkpoint()
            if latest is None or not latest.endswith(f"-{final}"):
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


def run_experiment(experiment, make_trainer, header: list[str], flags_text: str | None = None, log=print) -> dict:
    """The backend-independent part of crn-train: prints the configuration, takes a fixed sample batch,
    builds the trainer (`make_trainer()`), restores or starts it, writes the record (experiment.json with
    the backend, flags.txt), and trains on the seeded stream from the checkpointed input position.
    Returns the last loss terms."""
    import tensorflow as tf

    from crn_tf import data, fileio  # deferred: tf.data only where a run starts
    from crn_tf.experiment import EXPERIMENT_FILENAME, FLAGS_FILENAME

    model, d, tc, model_dir = experiment.model, experiment.data, experiment.training, experiment.model_dir
    for line in header:
        log(line)
    sample_batch = None  # a fixed batch of the sample split if the data has one, else the first training batch
    if d.sample_split and tf.io.gfile.exists(data.manifest_path(d.data_dir, d.sample_split)):
        samples = data.make_dataset(
            d.data_dir, d.sample_split, batch_size=min(4, tc.batch_size * 2), image_size=d.size, config=model,
            training=False,
        )  # fmt: skip
        sample_batch = next(iter(samples))
    trainer = make_trainer()
    log(trainer.initialize())
    if trainer.chief:  # after initialize(): the lock is held and a conflicting model_dir was refused
        fileio.write_json(f"{model_dir}/{EXPERIMENT_FILENAME}", {**experiment.to_dict(), "backend": trainer.backend})
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
