"""crn-train on the JAX backend: the jit-compiled step, data parallelism on 2 devices, resume after
SIGKILL, and one model_dir for both backends (TensorFlow tools read what JAX trained, JAX reads what
TensorFlow wrote, --init_from both ways). Each JAX run is a subprocess (the backend is fixed when
Keras is imported); this process is on TensorFlow (conftest)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import converted_synthetic

from crn_tf import convert_original
from crn_tf.bundle import BundleReader
from crn_tf.config import get_preset
from crn_tf.experiment import TrainConfig
from crn_tf.model import build_model
from crn_tf.model_dir import load_model, save_model_dir
from crn_tf.trainer import Trainer

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run(args, **env):
    result = subprocess.run(args, env=_env(**env), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return converted_synthetic(tmp_path_factory.mktemp("synthetic"), [("train", 4, 3)], 16, 32)


def _crn_train(data_dir, model_dir, steps, **flags):
    args = [sys.executable, "-m", "crn_tf.train", "--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
    args += ["--batch_size=2", "--vgg_weights=none", "--checkpoint_every=2", "--image_every=100000", f"--steps={steps}"]
    return args + [f"--{k}={v}" for k, v in flags.items()]


def _weights(prefix: str) -> dict:
    """The model's weights in a checkpoint, by object path (through the object graph)."""
    reader = BundleReader(prefix)
    model = build_model(get_preset("tiny"))
    from crn_tf.api import find_variable_key

    return {v.path: reader.read(find_variable_key(reader, v.path)) for v in model.weights}


def test_step_on_two_devices_equals_one_and_lowers_the_loss(tmp_path):
    """keras.distribution.DataParallel over 2 CPU devices (the batch split, one all-reduce in the compiled
    step) updates the weights as one device does with the whole batch; 6 more steps lower the loss;
    --init_from a TensorFlow-written model_dir copies its weights."""
    source = build_model(get_preset("tiny"))
    for v in source.weights:
        v.assign(tf.random.stateless_normal(v.shape, seed=[len(v.path), 3]))
    save_model_dir(source, str(tmp_path / "tf_model"))
    out = tmp_path / "probe.npz"
    probe = [sys.executable, str(ROOT / "tests/jax_probe.py"), str(tmp_path / "work"), str(tmp_path / "tf_model")]
    stdout = _run([*probe, str(out)], XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert "devices: 2" in stdout
    r = np.load(out)
    np.testing.assert_array_equal(r["one_initial"], r["two_initial"])  # the same seed, the same draws
    # Two half-batch gradients summed by the all-reduce vs one whole-batch gradient: float32 round-off of
    # another summation order (~1e-7 relative), then one Adam step of 1e-3 per weight.
    np.testing.assert_allclose(r["two_updated"], r["one_updated"], rtol=0, atol=1e-5)
    assert np.abs(r["one_updated"] - r["one_initial"]).max() > 5e-4  # the step did move the weights
    np.testing.assert_allclose(r["two_loss"], r["one_loss"], rtol=1e-5)
    losses = r["losses"]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * r["one_loss"], losses  # measured: 123 -> 80
    assert str(r["init_from_message"]).startswith(f"initialised from {tmp_path / 'tf_model'}: copied ")
    expected = np.concatenate([np.ravel(v.numpy()) for v in source.weights])
    np.testing.assert_array_equal(r["init_from_weights"], expected)  # copied, not computed


TWO_DEVICES = "--xla_force_host_platform_device_count=2"


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """6 uninterrupted JAX steps, the batch of 2 split over 2 CPU devices (checkpoints at 2, 4, 6):
    the reference of the SIGKILL and the two-process tests."""
    straight = str(tmp_path_factory.mktemp("straight") / "run")
    return straight, _run(_crn_train(data_dir, straight, 6, deterministic="true"), XLA_FLAGS=TWO_DEVICES)


def test_crn_train_on_jax_resumes_after_sigkill_exactly_and_tensorflow_reads_it(data_dir, straight_run, tmp_path):
    (straight, out), killed = straight_run, str(tmp_path / "killed")
    assert "backend: jax " in out and "done: step 6, 6 steps" in out
    record = json.loads(pathlib.Path(straight, "experiment.json").read_text())
    assert record["backend"] == "jax"
    history = json.loads(pathlib.Path(straight, "train_config_history.json").read_text())
    assert [h["backend"] for h in history] == ["jax"]

    # The same run, SIGKILLed once a checkpoint is written, then started again.
    process = subprocess.Popen(
        _crn_train(data_dir, killed, 100000, deterministic="true"), env=_env(XLA_FLAGS=TWO_DEVICES), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not os.path.exists(f"{killed}/ckpt-2.index"):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait(30)
    out = _run(_crn_train(data_dir, killed, 6, deterministic="true"), XLA_FLAGS=TWO_DEVICES)
    resumed = int(re.search(r"resumed from \S+ckpt-(\d+) at step (\d+)", out).group(1))
    assert 2 <= resumed < 6 and "done: step 6" in out
    # Step- and input-exact: the same weights as the run that never stopped (XLA:CPU and the seeded
    # input stream are deterministic; Adam's moments come back from the checkpoint).
    a, b = _weights(f"{straight}/ckpt-6"), _weights(f"{killed}/ckpt-6")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)

    # TensorFlow's tools read the JAX-trained model_dir: the model, and a TensorFlow trainer resumes it
    # (the optimizer's state, in JAX's layout, starts afresh, and it says so).
    model = load_model(straight)
    for v in model.weights:
        np.testing.assert_array_equal(v.numpy(), a[v.path])
    trainer = Trainer(get_preset("tiny"), TrainConfig(batch_size=2, vgg_weights="none"), straight, log=print)
    try:
        message = trainer.initialize()
    finally:
        trainer.close()
    assert message.startswith(f"resumed from {straight}/ckpt-6 at step 6; the checkpoint was written by the jax ")
    assert "optimizer state (Adam's moments) started afresh" in message
    for v in trainer.model.weights:
        np.testing.assert_array_equal(v.numpy(), a[v.path])
    assert trainer.input_position() == 12  # 6 steps of 2 examples


def test_imported_original_runs_on_jax_as_the_authors_graph(tmp_path):
    """crn-import-original's model_dir on JAX (crn_tf.LayoutToPhoto, no TensorFlow) gives the authors'
    TF1 graph's photos within 1 grey level."""
    from test_convert_original import _save_original

    prefix, layout, expected = _save_original(tmp_path / "orig", {4: 16, 8: 16, 16: 8}, k=1, batch=2, seed=1)
    convert_original.import_original(prefix, str(tmp_path / "imported"))
    np.save(tmp_path / "ids.npy", np.argmax(layout, axis=-1).astype(np.uint8))
    code = textwrap.dedent(f"""
        import sys, numpy as np, crn_tf
        crn = crn_tf.LayoutToPhoto.from_model_dir({str(tmp_path / "imported")!r})
        np.save({str(tmp_path / "jax.npy")!r}, crn.predict(np.load({str(tmp_path / "ids.npy")!r})))
        print('tensorflow' in sys.modules)
        """)
    assert _run([sys.executable, "-c", code]).split() == ["False"]
    photos = np.load(tmp_path / "jax.npy").astype(int)
    reference = np.round(np.clip(expected, 0, 255)).astype(int)
    # Rounded to grey levels: float32 round-off (~1e-5 of 255) can move a value across a .5 boundary.
    assert photos.shape == reference.shape and np.abs(photos - reference).max() <= 1


def test_two_processes_train_as_one_process_on_two_devices(data_dir, straight_run, tmp_path):
    """Two local processes (jax.distributed through Keras' KERAS_DISTRIBUTION_* variables, one CPU device
    each, gloo collectives) train the same weights as one process whose batch is split over 2 devices."""
    from crn_tf.distribution import localhost_workers

    (two_devices, _), two_processes = straight_run, str(tmp_path / "processes")
    addresses = ",".join(localhost_workers(2))
    processes = [
        subprocess.Popen(
            _crn_train(data_dir, two_processes, 2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(
                KERAS_DISTRIBUTION_JOB_ADDRESSES=addresses,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(i),
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "DataParallel over 2 devices in 2 process(es)" in outputs[0] and "done: step 2" in outputs[1]
    assert sorted(os.listdir(two_processes)).count("ckpt-2.index") == 1  # written by the chief only
    a, b = _weights(f"{two_devices}/ckpt-2"), _weights(f"{two_processes}/ckpt-2")
    for name in a:
        # The same sum of two half-batch gradients, by gloo instead of in one process: float32 round-off.
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)
