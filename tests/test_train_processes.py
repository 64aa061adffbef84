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

import numpy as np
import pytest
import tensorflow as tf

from crn_tf.model import load_model
from data_tools import cityscapes, common, synthetic

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for split, count, seed in (("train", 4, 3), ("val", 3, 4)):
        synthetic.generate(str(root / "cityscapes"), split, count, 32, 64, seed=seed)
        common.convert(cityscapes.make_source(str(root / "cityscapes"), split), str(root / "tfr"), split, num_shards=2)
    return str(root / "tfr")


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


def test_sigkill_then_resume_continues_from_the_last_checkpoint(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    process = _crn_train(data_dir, model_dir, steps=100000)
    try:
        _wait_for_checkpoint(process, model_dir, at_least=10)
    finally:
        process.kill()  # SIGKILL: no chance to save
        process.wait(30)
    before = _checkpoint_steps(model_dir)
    last = before[-1]
    assert before == sorted(set(before)) and all(s % 5 == 0 for s in before)

    resumed = _crn_train(data_dir, model_dir, steps=last + 7)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"resumed from {model_dir}/ckpt-{last} at step {last}" in out
    assert f"done: step {last + 7}, 7 steps" in out
    after = _checkpoint_steps(model_dir)
    assert after == sorted(set(after)) and after[-1] == last + 7  # no repeated or lost step numbers
    assert [s for s in after if s <= last] == [s for s in before if s in after]
    assert all(tf.io.gfile.exists(f"{model_dir}/ckpt-{s}.index") for s in after)
    model = load_model(model_dir)  # the final weights are usable
    assert np.isfinite(model(tf.one_hot(tf.zeros([1, 32, 64], tf.int32), 20))).all()


def test_sigterm_saves_before_exiting(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    process = _crn_train(data_dir, model_dir, steps=100000, checkpoint_every=7)
    try:
        _wait_for_checkpoint(process, model_dir, at_least=7)  # training is under way
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, out
    assert "signal SIGTERM: saving a checkpoint" in out
    step = int(re.search(r"done: step (\d+)", out).group(1))
    assert step >= 7 and _checkpoint_steps(model_dir)[-1] == step  # the step it stopped at is saved


def test_cli_epochs_init_from_and_train_modules(data_dir, tmp_path):
    # The README's fine-tuning commands, on the tiny scale: a bigger cascade from a smaller one.
    small = _crn_train(data_dir, tmp_path / "small", steps=2)
    out, _ = small.communicate(timeout=240)
    assert small.returncode == 0, out
    big = _crn_train(
        data_dir, tmp_path / "big", widths="16,16,8,8", init_from=tmp_path / "small", train_modules=1, epochs=1
    )
    out, _ = big.communicate(timeout=240)
    assert big.returncode == 0, out
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
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
sys.path.insert(0, sys.argv[4])
from test_train import make_pairs, dataset
from crn_tf.config import get_preset
from crn_tf.train import Trainer, TrainConfig
config = TrainConfig(batch_size=4, steps=3, vgg_weights="none", checkpoint_every=2, image_every=1000)
trainer = Trainer(get_preset("tiny"), config, sys.argv[3], strategy=strategy, log=lambda *a, **k: None)
assert trainer.strategy.num_replicas_in_sync == 2
print(trainer.initialize())
trainer.train(dataset(make_pairs(4, seed=int(sys.argv[2])), 4))
np.savez(os.path.join(sys.argv[3], f"weights_{sys.argv[2]}.npz"), *[v.numpy() for v in trainer.model.weights])
print("worker done", trainer.chief, int(trainer.step.numpy()))
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy_on_two_local_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    model_dir = tmp_path / "run"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), workers, str(i), str(model_dir), str(ROOT / "tests")],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out
    assert "worker done True 3" in outputs[0] and "worker done False 3" in outputs[1]
    chief, other = (np.load(model_dir / f"weights_{i}.npz") for i in range(2))
    for key in chief.files:
        # One model, kept in sync: both workers apply the same all-reduced gradient to the same weights with
        # the same single-threaded element-wise update, so they agree exactly even though kernels are not
        # bit-deterministic across processes (each step's gradient is computed once and shared).
        np.testing.assert_array_equal(chief[key], other[key])
    # Only the chief keeps checkpoints; the other worker's scratch copies are gone.
    assert _checkpoint_steps(str(model_dir)) == [2, 3]
    assert not list(model_dir.glob(".worker-tmp-*"))
    assert json.loads((model_dir / "crn_config.json").read_text())["name"] == "tiny"
