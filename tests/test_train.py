import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from conftest import make_pairs

from crn_tf import evaluate
from crn_tf.config import get_preset
from crn_tf.lock import LOCK_FILENAME, ModelDirLock, ModelDirLocked
from crn_tf.model_dir import CheckpointUnreadable, checkpoints, load_model
from crn_tf.synthesize import Synthesizer
from crn_tf.train import TrainConfig, Trainer, TrainingDiverged, init_from, parse_train_modules

TINY = get_preset("tiny")


def dataset(pairs, batch_size):
    ds = tf.data.Dataset.from_tensor_slices(pairs).repeat().batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def train_config(**overrides):
    base = dict(batch_size=2, steps=1, vgg_weights="none", checkpoint_every=1000, image_every=1000, summary_every=1)
    return TrainConfig(**{**base, **overrides})


def quiet(*args, **kwargs):
    pass


def weights_of(trainer):
    return [v.numpy() for v in trainer.model.weights]


@contextlib.contextmanager
def all_reduced(monkeypatch):
    """Records (elements, bytes) of every value reduced across replicas (StrategyExtended.reduce_to and
    batch_reduce_to, which every all-reduce, strategy.reduce and optimizer aggregation goes through).
    A tf.function step calls them while it is traced, i.e. once per step's graph."""
    calls = []

    def size(value):
        t = value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
        return t.shape.num_elements(), t.shape.num_elements() * t.dtype.size

    extended = tf.distribute.StrategyExtended
    reduce_to, batch_reduce_to = extended.reduce_to, extended.batch_reduce_to

    def counting_reduce_to(self, reduce_op, value, destinations, options=None):
        calls.append(size(value))
        return reduce_to(self, reduce_op, value, destinations, options)

    def counting_batch_reduce_to(self, reduce_op, value_destination_pairs, options=None):
        pairs = list(value_destination_pairs)
        calls.extend(size(v) for v, _ in pairs)
        return batch_reduce_to(self, reduce_op, pairs, options)

    with monkeypatch.context() as m:
        m.setattr(extended, "reduce_to", counting_reduce_to)
        m.setattr(extended, "batch_reduce_to", counting_batch_reduce_to)
        yield calls


def assert_one_all_reduce(calls, trainer, gradient_bytes=4):
    """All-reduced per step: each trainable parameter once, plus the loss terms (scalars)."""
    params = sum(v.shape.num_elements() for v in trainer.model.trainable_variables)
    elements, nbytes = sum(c[0] for c in calls), sum(c[1] for c in calls)
    scalars = len(trainer.loss.layer_names) + 2  # total, its terms, and slack for one more
    print(f"all-reduced per step: {elements} elements, {nbytes} bytes; {params} trainable parameters")
    assert params <= elements <= params + scalars, f"{elements} elements all-reduced for {params} parameters"
    assert nbytes <= gradient_bytes * params + 4 * scalars


@pytest.mark.parametrize("clip_norm, wire", [(None, None), (1e-3, None), (None, "bfloat16"), (None, "float16")])
def test_two_replicas_equal_one_device(tmp_path, monkeypatch, clip_norm, wire):
    pairs = make_pairs(2, seed=1)
    results = []
    # Each MirroredStrategy in a process numbers its collectives from 1, and a collective instance that
    # already carried float32 (in an earlier test) cannot carry bfloat16: reduce on one device instead.
    cross_device_ops = tf.distribute.ReductionToOneDevice() if wire else None
    for name, strategy in [
        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=cross_device_ops)),
        ("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
    ]:
        # SGD: unlike Adam's first step (~lr * sign(g)), its update shows any error in the gradient's scale.
        trainer = Trainer(
            TINY,
            train_config(steps=2 if wire is None else 1, clip_norm=clip_norm, all_reduce_dtype=wire),
            str(tmp_path / name),
            strategy=strategy,
            log=quiet,
            make_optimizer=lambda: keras.optimizers.SGD(learning_rate=0.05),
        )
        assert trainer.strategy.num_replicas_in_sync == (2 if name == "mirrored" else 1)
        trainer.initialize()
        before = weights_of(trainer)
        with all_reduced(monkeypatch) as calls:
            terms = trainer.train(dataset(pairs, 2))
        if name == "mirrored":  # each gradient crosses the replicas once (before: twice), in the wire dtype
            assert_one_all_reduce(calls, trainer, gradient_bytes=2 if wire else 4)
        results.append((before, weights_of(trainer), terms))
    (before_a, after_a, terms_a), (before_b, after_b, terms_b) = results
    for a, b in zip(before_a, before_b):
        np.testing.assert_array_equal(a, b)  # same seed, same start: seeded initialisers, no kernel sums
    moved = max(np.abs(a - b).max() for a, b in zip(after_b, before_b))
    assert moved > 1e-6
    if wire is None:
        assert terms_a["total"] == pytest.approx(terms_b["total"], rel=1e-5)
        # float32 sums in another order on 2 replicas: rounding differences only.
        for a, b in zip(after_a, after_b):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        return
    # One step. 16 bits on the wire: each update (after - before) is within a few roundings of float32's
    # relative to the largest update of its tensor (two casts plus the 16-bit sum; bfloat16 keeps 8
    # significant bits, float16 11), and differs from float32's by more than float32 rounding (the
    # option took effect).
    worst = 0.0
    for a, b, start in zip(after_a, after_b, before_a):
        update_a, update_b = a - start, b - start
        scale = np.abs(update_b).max()
        if scale > 0:
            worst = max(worst, np.abs(update_a - update_b).max() / scale)
    print(f"{wire} all-reduce: largest update difference {worst:.2e} of the update")
    bits = {"bfloat16": 8, "float16": 11}[wire]
    assert 1e-5 < worst < 2.0 ** (2 - bits), worst


def test_tiny_model_overfits_a_few_pairs(tmp_path):
    pairs = make_pairs(4, seed=2)
    config = train_config(steps=0, learning_rate=3e-3, batch_size=4, summary_every=20)
    trainer = Trainer(TINY, config, str(tmp_path), log=quiet)
    trainer.initialize()
    ds = dataset(pairs, 4)
    first = trainer.train(ds, steps=1)["total"]
    last = trainer.train(ds, steps=60)["total"]
    print(f"overfitting: loss {first:.3f} -> {last:.3f} ({first / last:.1f}x)")  # 83.4 -> ~15 (5-6x) here
    assert first / last >= 2.0
    assert int(trainer.step.numpy()) == 60


def test_checkpoints_samples_and_summaries(tmp_path):
    model_dir = str(tmp_path / "run")
    config = train_config(steps=4, checkpoint_every=2, image_every=2)
    trainer = Trainer(TINY, config, model_dir, log=quiet)
    assert trainer.initialize() == "starting from scratch"
    trainer.train(dataset(make_pairs(2), 2))
    assert [int(p.rsplit("-", 1)[1]) for p in trainer.manager.checkpoints] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run/samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    grid = tf.io.decode_png(tf.io.read_file(str(tmp_path / "run/samples/step_00000004.png")))
    assert grid.shape == (2 * 16, 3 * 32, 3)  # 2 examples x (layout | synthesized | reference)
    assert list((tmp_path / "run/train").iterdir())  # TensorBoard events
    # A new trainer on the same model_dir resumes, and continues the step count.
    again = Trainer(TINY, dataclasses.replace(config, steps=6), model_dir, log=quiet)
    assert again.initialize().startswith(f"resumed from {model_dir}/ckpt-4 at step 4")
    np.testing.assert_array_equal(weights_of(again)[0], weights_of(trainer)[0])  # restored: a copy, exact
    again.train(dataset(make_pairs(2), 2))
    assert [int(p.rsplit("-", 1)[1]) for p in again.manager.checkpoints] == [2, 4, 6]


def test_resuming_with_another_config_is_refused(tmp_path):
    Trainer(TINY, train_config(), str(tmp_path), log=quiet).initialize()
    with pytest.raises(ValueError, match=r"widths: saved \[16, 16, 8\], requested \[16, 16, 16\]"):
        Trainer(get_preset("tiny", widths=(16, 16, 16)), train_config(), str(tmp_path), log=quiet)


def test_nan_loss_stops_without_overwriting_the_last_checkpoint(tmp_path):
    pairs = make_pairs(2)
    trainer = Trainer(TINY, train_config(steps=2, checkpoint_every=1), str(tmp_path), log=quiet)
    trainer.initialize()
    trainer.train(dataset(pairs, 2))
    assert trainer.manager.latest_checkpoint.endswith("ckpt-2")
    pairs["image"][:] = np.nan
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*ckpt-2"):
        trainer.train(dataset(pairs, 2), steps=5)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def poison_gradient(trainer, index, step, replica=1):
    """Makes replica `replica`'s gradient of trainable variable `index` NaN at `step` (the loss stays finite)."""
    compute = trainer._replica_gradients

    def poisoned(batch):
        grads, terms = compute(batch)
        ctx = tf.distribute.get_replica_context()
        hit = tf.logical_and(tf.equal(trainer.step + 1, step), tf.equal(ctx.replica_id_in_sync_group, replica))
        grads[index] = tf.where(hit, tf.fill(tf.shape(grads[index]), np.nan), grads[index])
        return grads, terms

    trainer._replica_gradients = poisoned


@pytest.mark.parametrize("policy", [None, "float16"])
def test_non_finite_gradient_is_never_applied(tmp_path, policy):
    # On one of 2 replicas, with a finite loss: the check is on the summed gradient, so both replicas agree.
    trainer = Trainer(
        TINY,
        train_config(steps=3, mixed_precision=policy, checkpoint_every=1),
        str(tmp_path),
        strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
        log=quiet,
    )
    trainer.initialize()
    poison_gradient(trainer, index=2, step=2)
    if policy == "float16":  # Keras' initial 2^15 overflows this model's float16 gradients: start lower
        trainer.optimizer.dynamic_scale.assign(64.0)
    ds = dataset(make_pairs(2), 2)
    start = weights_of(trainer)
    trainer.train(ds, steps=1)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(weights_of(trainer), start))  # step 1 applied
    model, optimizer = weights_of(trainer), [v.numpy() for v in trainer.optimizer.variables]
    name = trainer.model.trainable_variables[2].path
    if policy is None:  # float32: the run stops, naming the step and the variable, with nothing updated
        with pytest.raises(TrainingDiverged, match=rf"at step 2 the gradient is not finite \(NaN/Inf in {name}\)"):
            trainer.train(ds)
        assert int(trainer.step.numpy()) == 1 and trainer.manager.latest_checkpoint.endswith("ckpt-1")
        for a, b in zip(weights_of(trainer) + [v.numpy() for v in trainer.optimizer.variables], model + optimizer):
            np.testing.assert_array_equal(a, b)  # exact: never written (nothing was applied)
        return
    # float16: the loss scale optimizer skips the step (weights unchanged), halves its scale, goes on.
    scale = float(trainer.optimizer.dynamic_scale.numpy())
    trainer.train(ds, steps=2)
    for a, b in zip(weights_of(trainer), model):
        np.testing.assert_array_equal(a, b)  # exact: the skipped step wrote nothing
    assert float(trainer.optimizer.dynamic_scale.numpy()) == scale / 2
    trainer.train(ds, steps=3)  # the next step applies again
    assert any(np.abs(a - b).max() > 0 for a, b in zip(weights_of(trainer), model))


def test_init_from_a_smaller_model_and_train_only_some_modules(tmp_path):
    small = Trainer(TINY, train_config(steps=2), str(tmp_path / "small"), log=quiet)
    small.initialize()
    small.train(dataset(make_pairs(2), 2))

    bigger = get_preset("tiny", widths=(16, 16, 8, 8))  # one more module: 32x64
    config = train_config(
        steps=3,
        init_from=str(tmp_path / "small"),
        train_modules=parse_train_modules("1", bigger.module_names),
    )
    assert config.train_modules == ("module_32x64", "head")
    trainer = Trainer(bigger, config, str(tmp_path / "big"), log=quiet)
    message = trainer.initialize()
    assert "copied ['module_4x8', 'module_8x16', 'module_16x32', 'head']" in message
    for name in ("module_4x8", "module_8x16", "module_16x32"):
        for a, b in zip(getattr(trainer.model, name).weights, getattr(small.model, name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())  # copied by init_from: exact
    frozen_before = {v.path: v.numpy() for n in trainer.frozen for v in getattr(trainer.model, n).weights}
    trained_before = {v.path: v.numpy() for v in trainer.model.trainable_variables}
    assert {p.split("/")[1] for p in trained_before} == {"module_32x64", "head"}
    trainer.train(dataset(make_pairs(2, 32, 64), 2))
    for v in trainer.model.weights:
        if v.path in frozen_before:
            np.testing.assert_array_equal(v.numpy(), frozen_before[v.path])  # bit-identical: never written
    assert any(np.abs(v.numpy() - trained_before[v.path]).max() > 0 for v in trainer.model.trainable_variables)

    with pytest.raises(ValueError, match="unknown module"):
        Trainer(TINY, train_config(train_modules=("module_64x128",)), str(tmp_path / "x"), log=quiet)
    with pytest.raises(ValueError, match="--init_from=.*not a crn_tf model_dir"):
        init_from(trainer.model, str(tmp_path))


@pytest.mark.parametrize("policy, jit", [("float16", True), ("bfloat16", False)])
def test_mixed_precision_steps_and_policy_is_restored(tmp_path, monkeypatch, policy, jit):
    # float16 with --jit_compile on 2 replicas: XLA compiles each replica's forward and backward; the
    # all-reduce, clipping and the loss-scaled update run outside it. The image loss keeps the compile short.
    config = train_config(
        steps=2, mixed_precision=policy, clip_norm=1.0, jit_compile=jit, loss="image" if jit else "perceptual"
    )
    trainer = Trainer(
        TINY, config, str(tmp_path), strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), log=quiet
    )
    assert keras.mixed_precision.global_policy().name == "float32"
    assert trainer.model.refinement_modules[0].compute_dtype == policy
    trainer.initialize()
    if policy == "float16":  # Keras' initial 2^15 overflows this model's float16 gradients (steps skipped)
        trainer.optimizer.dynamic_scale.assign(64.0)
    before = weights_of(trainer)
    with all_reduced(monkeypatch) as calls:
        terms = trainer.train(dataset(make_pairs(2), 2))
    assert_one_all_reduce(calls, trainer)  # also with float16 loss scaling and clipping
    assert np.isfinite(terms["total"]) and int(trainer.step.numpy()) == 2
    assert any(np.abs(a - b).max() > 0 for a, b in zip(weights_of(trainer), before))


def test_automatic_layer_weights_are_rebalanced_and_checkpointed(tmp_path):
    config = train_config(steps=4, automatic_weights=True, rebalance_after=3, rebalance_window=2)
    trainer = Trainer(TINY, config, str(tmp_path), log=quiet)
    trainer.initialize()
    np.testing.assert_array_equal(trainer.loss.layer_weights.numpy(), np.ones(6))  # initial values, set exactly
    trainer.train(dataset(make_pairs(2), 2))
    weights = trainer.loss.layer_weights.numpy()
    assert bool(trainer.loss.rebalanced.numpy()) and not np.allclose(weights, 1.0)
    resumed = Trainer(TINY, config, str(tmp_path), log=quiet)
    resumed.initialize()
    np.testing.assert_array_equal(resumed.loss.layer_weights.numpy(), weights)  # restored: a copy, exact


def test_unreadable_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys):
    # A model_dir whose name has glob characters: checkpoints are still found and rotated (keep 2).
    model_dir = str(tmp_path / "run[1]")
    config = train_config(steps=4, checkpoint_every=1, keep_checkpoints=2)
    trainer = Trainer(TINY, config, model_dir, log=quiet)
    trainer.initialize()
    trainer.train(dataset(make_pairs(2), 2))
    trainer.close()
    ckpt_files = sorted(p.name for p in (tmp_path / "run[1]").iterdir() if p.name.startswith("ckpt-"))
    assert ckpt_files == [f"ckpt-{n}.{e}" for n in (3, 4) for e in ("data-00000-of-00001", "index")]
    at_3 = [v.numpy() for v in load_model(f"{model_dir}/ckpt-3").weights]
    data = tmp_path / "run[1]/ckpt-4.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy

    unreadable = rf"{re.escape(model_dir)}/ckpt-4 is unreadable: its data .*ckpt-4\.data-00000-of-00001 \(1000 bytes\)"
    with pytest.raises(CheckpointUnreadable, match=unreadable + r".*older checkpoints to pass instead: .*ckpt-3"):
        load_model(model_dir)  # crn-export, crn-synthesize, crn-eval and --init_from load through this
    with pytest.raises(ValueError, match=unreadable):
        Synthesizer.from_model_dir(model_dir)
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["crn-eval", f"--model_dir={model_dir}", f"--data_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="crn-eval: checkpoint " + unreadable):
        evaluate.main(["crn-eval"], fv)

    resumed = Trainer(TINY, dataclasses.replace(config, steps=5), model_dir, log=quiet)
    message = resumed.initialize()
    assert message.startswith(f"resumed from {model_dir}/ckpt-3 at step 3; skipped checkpoint {model_dir}/ckpt-4")
    assert "moved the unreadable checkpoint files aside" in message
    for a, b in zip(resumed.model.weights, at_3):
        np.testing.assert_array_equal(a.numpy(), b)  # restored from ckpt-3: a copy, exact
    assert (tmp_path / "run[1]/ckpt-4.data-00000-of-00001.unreadable").stat().st_size == 1000  # kept
    resumed.train(dataset(make_pairs(2), 2))
    assert [int(p.rsplit("-", 1)[1]) for p in checkpoints(model_dir)] == [5, 4]
    ckpt_files = sorted(p.name for p in (tmp_path / "run[1]").iterdir() if p.name.startswith("ckpt-"))
    assert ckpt_files == sorted(
        [f"ckpt-{n}.{e}" for n in (4, 5) for e in ("data-00000-of-00001", "index")]
        + ["ckpt-4.data-00000-of-00001.unreadable", "ckpt-4.index.unreadable"]
    )  # ckpt-3 rotated out: the manager still knows it after the fallback
    assert load_model(model_dir).weights[0].shape == resumed.model.weights[0].shape
    # A state file naming absolute paths elsewhere (a model_dir moved): checkpoints are found by name.
    tf.compat.v1.train.update_checkpoint_state(
        model_dir, "/elsewhere/ckpt-5", ["/elsewhere/ckpt-4", "/elsewhere/ckpt-5"]
    )
    assert checkpoints(model_dir) == [f"{model_dir}/ckpt-5", f"{model_dir}/ckpt-4"]


def test_one_writer_per_model_dir(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock_path = model_dir / LOCK_FILENAME
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "started": "earlier", "command": "crn-train ..."}
    lock_path.write_text(json.dumps(alive))
    with pytest.raises(ModelDirLocked, match=rf"in use by another crn-train run: host '{socket.gethostname()}', "):
        Trainer(TINY, train_config(), str(model_dir), log=quiet)
    assert not (model_dir / "crn_config.json").exists() and json.loads(lock_path.read_text()) == alive
    # Another machine's lock cannot be checked from here: refused, naming the file to delete.
    lock_path.write_text(json.dumps(dict(alive, host="elsewhere")))
    with pytest.raises(ModelDirLocked, match=rf"host 'elsewhere'.*delete {re.escape(str(lock_path))}"):
        ModelDirLock(str(model_dir)).acquire()
    # A holder that has exited: its lock is taken over, saying so.
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock_path.write_text(json.dumps(dict(alive, pid=gone.pid)))
    lines = []
    trainer = Trainer(TINY, train_config(), str(model_dir), log=lines.append)
    assert lines == [
        f"taking over the stale lock {lock_path} of host '{socket.gethostname()}', pid {gone.pid} "
        f"(since earlier: crn-train ...): no process {gone.pid} on this host"
    ]
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    trainer.close()
    assert not lock_path.exists()


def test_resume_records_changes_and_may_change_train_modules(tmp_path):
    first = Trainer(TINY, train_config(steps=1, train_modules=("head",)), str(tmp_path), log=quiet)
    first.initialize()
    first.train(dataset(make_pairs(2), 2))
    first.close()
    config = train_config(steps=2, learning_rate=1e-3)
    resumed = Trainer(TINY, config, str(tmp_path), log=quiet)
    message = resumed.initialize()
    assert message.startswith(f"resumed from {tmp_path}/ckpt-1 at step 1; ")
    assert (
        "changed since the last run: learning_rate 0.0001 -> 0.001, steps 1 -> 2, train_modules ['head'] -> None"
        in (message)
    )
    assert "--train_modules changed (['head'] -> ['all']): model, step and loss state restored, optimizer state " in (
        message
    )
    module = [v.numpy() for v in resumed.model.module_4x8.weights]
    resumed.train(dataset(make_pairs(2), 2))  # all modules train now
    assert any(np.abs(v.numpy() - m).max() > 0 for v, m in zip(resumed.model.module_4x8.weights, module))
    history = json.loads((tmp_path / "train_config_history.json").read_text())
    assert [(h["resumed_from"], h["step"]) for h in history] == [(None, 0), (f"{tmp_path}/ckpt-1", 1)]
    assert history[1]["changed"] == {"learning_rate": [1e-4, 1e-3], "steps": [1, 2], "train_modules": [["head"], None]}
    assert json.loads((tmp_path / "train_config.json").read_text()) == history[1]["train_config"]
