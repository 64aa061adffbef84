"""Training in real processes: crn-train killed and resumed, SIGTERM, two workers on localhost."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import converted_synthetic
from test_train import dataset, make_pairs

from crn_tf.config import get_preset
from crn_tf.distribution import localhost_workers
from crn_tf.model_dir import load_model
from crn_tf.train import TrainConfig, Trainer

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return converted_synthetic(tmp_path_factory.mktemp("synthetic"), [("train", 4, 3), ("val", 3, 4)], 32, 64)


def _crn_train(data_dir, model_dir, steps=None, **flags):
    args = [sys.executable, "-m", "crn_tf.train", "--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
    args += ["--batch_size=2", "--vgg_weights=none", "--checkpoint_every=5", "--image_every=100000"]
    args += [f"--steps={steps}"] if steps is not None else []
    args += [f"--{k}={v}" for k, v in flags.items()]
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_steps(model_dir):
    state = tf.train.get_checkpoint_state(model_dir)
    if state is None:
        return []
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def _wait_for_checkpoint(process, model_dir, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = _checkpoint_steps(model_dir)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if process.poll() is not None:
            pytest.fail(f"crn-train exited early ({process.returncode}):\n{process.stdout.read()}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no checkpoint >= {at_least} within {timeout}s")


def test_sigkill_then_resume_then_sigterm(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    process = _crn_train(data_dir, model_dir, steps=100000)
    try:
        _wait_for_checkpoint(process, model_dir, at_least=5)
        # A second run on the model_dir in use stops at once, naming the holder.
        second = _crn_train(data_dir, model_dir, steps=100000)
        _wait_for_checkpoint(process, model_dir, at_least=10)
        out, _ = second.communicate(timeout=120)
    finally:
        process.kill()  # SIGKILL: no chance to save
        process.wait(30)
    assert second.returncode == 1
    assert f"crn-train: {model_dir} is in use by another crn-train run: host '{socket.gethostname()}', " in out
    assert f"pid {process.pid} " in out and f"delete {model_dir}/crn-train.lock" in out
    before = _checkpoint_steps(model_dir)
    last = before[-1]
    assert before == sorted(set(before)) and all(s % 5 == 0 for s in before)

    # Resumed with more steps; SIGTERM (a preemption) once it is under way: it saves the step it stopped at.
    resumed = _crn_train(data_dir, model_dir, steps=last + 1000)
    try:
        _wait_for_checkpoint(resumed, model_dir, at_least=last + 5)
        resumed.send_signal(signal.SIGTERM)
        out, _ = resumed.communicate(timeout=120)
    finally:
        resumed.kill()
    assert resumed.returncode == 0, out
    assert f"taking over the stale lock {model_dir}/crn-train.lock of host " in out
    assert f"pid {process.pid} " in out and f"no process {process.pid} on this host" in out
    assert f"resumed from {model_dir}/ckpt-{last} at step {last}; changed since the last run: steps " in out
    history = json.loads(pathlib.Path(model_dir, "train_config_history.json").read_text())
    assert [h["resumed_from"] for h in history] == [None, f"{model_dir}/ckpt-{last}"]
    assert "signal SIGTERM: saving a checkpoint" in out
    stopped = int(re.search(r"done: step (\d+), (\d+) steps", out).group(1))
    assert stopped >= last + 5 and f"done: step {stopped}, {stopped - last} steps" in out
    after = _checkpoint_steps(model_dir)
    assert after == sorted(set(after)) and after[-1] == stopped  # the step it stopped at is saved
    assert [s for s in after if s <= last] == [s for s in before if s in after]  # no repeated or lost numbers
    assert all(tf.io.gfile.exists(f"{model_dir}/ckpt-{s}.index") for s in after)
    model = load_model(model_dir)  # the final weights are usable
    assert np.isfinite(model(tf.one_hot(tf.zeros([1, 32, 64], tf.int32), 20))).all()


def test_cli_epochs_init_from_and_train_modules(data_dir, tmp_path):
    # The README's fine-tuning commands, on the tiny scale: a bigger cascade from a smaller one.
    small = _crn_train(data_dir, tmp_path / "small", steps=2, all_reduce_dtype="bfloat16", all_reduce_pack_mb=4)
    out, _ = small.communicate(timeout=240)
    assert small.returncode == 0, out
    assert '"all_reduce_dtype": "bfloat16", "all_reduce_implementation": "auto", "all_reduce_pack_mb": 4.0' in out
    assert "inter-op threads: TensorFlow's choice" in out
    big = _crn_train(
        data_dir, tmp_path / "big", widths="16,16,8,8", init_from=tmp_path / "small", train_modules=1, epochs=1,
        inter_op_threads=1,
    )  # fmt: skip
    out, _ = big.communicate(timeout=240)
    assert big.returncode == 0, out
    assert "inter-op threads: 1 (--inter_op_threads)" in out
    assert "initialised from" in out and "copied ['module_4x8', 'module_8x16', 'module_16x32', 'head']" in out
    assert '"train_modules": ["module_32x64", "head"]' in out
    assert "done: step 2, 2 steps" in out  # 1 epoch = 4 examples / batch 2
    # The sample grid at the checkpoint shows the 3 validation layouts (not the training batch of 2).
    grid = tf.io.decode_png(tf.io.read_file(str(tmp_path / "big/samples/step_00000002.png")))
    assert grid.shape == (3 * 32, 3 * 64, 3)
    frozen = load_model(str(tmp_path / "big")).module_4x8.conv1.kernel.numpy()
    # Copied by --init_from and frozen: exact.
    np.testing.assert_array_equal(frozen, load_model(str(tmp_path / "small")).module_4x8.conv1.kernel.numpy())


WORKER = """
import json, os, sys
cluster = {"worker": sys.argv[1].split(",")}
os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": int(sys.argv[2])}})
import keras, numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
sys.path.insert(0, sys.argv[4])
from test_train import make_pairs, dataset
from crn_tf.config import get_preset
from crn_tf.train import Trainer, TrainConfig
config = TrainConfig(batch_size=2, steps=int(sys.argv[5]), vgg_weights="none", checkpoint_every=2, image_every=1000)
trainer = Trainer(get_preset("tiny"), config, sys.argv[3], strategy=strategy, log=print,
                  make_optimizer=lambda: keras.optimizers.SGD(learning_rate=SGD_LEARNING_RATE))
assert trainer.strategy.num_replicas_in_sync == 2
print(trainer.initialize())
name = os.path.join(sys.argv[3], f"weights_{sys.argv[2]}")
if int(trainer.step.numpy()) == 0:
    np.savez(name + "_start.npz", *[v.numpy() for v in trainer.model.weights])
trainer.train(dataset(make_pairs(2, seed=1), 2))  # both workers: the same 2 pairs, one per worker
np.savez(name + ".npz", *[v.numpy() for v in trainer.model.weights])
print("worker done", trainer.chief, int(trainer.step.numpy()))
"""
SGD_LEARNING_RATE = 0.002  # SGD: the update is proportional to the gradient, so a wrong scale shows


def _start_workers(tmp_path, model_dir, steps):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("SGD_LEARNING_RATE", repr(SGD_LEARNING_RATE)))
    workers = ",".join(localhost_workers(2))
    args = [workers, None, str(model_dir), str(ROOT / "tests"), str(steps)]
    return [
        subprocess.Popen(
            [sys.executable, str(script), *[str(i) if a is None else a for a in args]],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _finish(processes, timeout=240):
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out
    return outputs


def test_two_workers_preempted_resume_and_equal_one_device(tmp_path):
    """Two MultiWorkerMirroredStrategy workers on localhost (global batch 2, one pair each): a SIGTERM
    on the non-chief makes both save one checkpoint and stop; started again, both resume from it; at
    the end both hold the weights one device gets from batch 2 in as many steps."""
    model_dir = tmp_path / "run"
    processes = _start_workers(tmp_path, model_dir, steps=100000)
    try:
        _wait_for_checkpoint(processes[0], str(model_dir), at_least=2)
        processes[1].send_signal(signal.SIGTERM)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    outputs = _finish(processes, timeout=120)
    saved = _checkpoint_steps(str(model_dir))[-1]
    for out in outputs:
        assert f"preempted (SIGTERM on a worker): every worker saved step {saved} " in out
    assert f"({model_dir}/ckpt-{saved})" in outputs[0]
    assert not list(model_dir.glob(".worker-tmp-*")) and not list(model_dir.glob(".preemption-*"))

    steps = saved + 2
    outputs = _finish(_start_workers(tmp_path, model_dir, steps=steps))
    for out in outputs:
        assert f"resumed from {model_dir}/ckpt-{saved} at step {saved}" in out
    assert f"worker done True {steps}" in outputs[0] and f"worker done False {steps}" in outputs[1]
    chief, other = (np.load(model_dir / f"weights_{i}.npz") for i in range(2))
    for key in chief.files:
        # One model, kept in sync: both workers apply the same all-reduced gradient to the same weights with
        # the same single-threaded element-wise update, so they agree exactly even though kernels are not
        # bit-deterministic across processes (each step's gradient is computed once and shared).
        np.testing.assert_array_equal(chief[key], other[key])
    # Only the chief keeps checkpoints; the other worker's scratch copies are gone.
    assert _checkpoint_steps(str(model_dir))[-1] == steps
    assert not list(model_dir.glob(".worker-tmp-*"))
    assert json.loads((model_dir / "crn_config.json").read_text())["name"] == "tiny"

    # One device, batch 2 (both pairs), as many steps, from the same start.
    config = TrainConfig(batch_size=2, steps=steps, vgg_weights="none", checkpoint_every=1000, image_every=1000)
    one = Trainer(
        get_preset("tiny"),
        config,
        str(tmp_path / "one"),
        strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
        log=lambda *a, **k: None,
        make_optimizer=lambda: keras.optimizers.SGD(learning_rate=SGD_LEARNING_RATE),
    )
    one.initialize()
    start = np.load(model_dir / "weights_0_start.npz")
    for v, key in zip(one.model.weights, start.files):
        np.testing.assert_array_equal(v.numpy(), start[key])  # same seed, same initial weights
    one.train(dataset(make_pairs(2, seed=1), 2))
    # Compare the updates (end - start): float32 sums in another order across the workers, so they agree
    # to rounding (~1e-6 relative per step over a few steps); a gradient N times too large or small,
    # or one worker's pair counted twice, would be off by tens of percent.
    worst = 0.0
    for v, key in zip(one.model.weights, chief.files):
        expected, got = v.numpy() - start[key], chief[key] - start[key]
        if np.abs(expected).max() > 0:
            worst = max(worst, np.abs(got - expected).max() / np.abs(expected).max())
    print(f"two workers vs one device after {steps} steps: largest update difference {worst:.2e} of the update")
    assert worst < 1e-3
