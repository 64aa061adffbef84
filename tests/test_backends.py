"""One CRN on every Keras backend: the core imports no TensorFlow on JAX, and TensorFlow and JAX give
the same outputs, VGG-19 features, loss terms and gradients from the same weights; the checkpoint
reader and the Python API that need no TensorFlow.

The backend is fixed when Keras is imported, so each backend runs in a subprocess
(tests/backend_probe.py); this process is on TensorFlow (conftest).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from crn_tf import api
from crn_tf.bundle import BundleReader
from crn_tf.config import get_preset
from crn_tf.labels import ids_to_colors
from crn_tf.model import build_model
from crn_tf.model_dir import save_model_dir
from tests.conftest import png_bytes, random_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "backend_probe.py")


def run_on(backend: str, *args: str, code: str | None = None, script: str = PROBE) -> str:
    """Runs `script` with `args` (or `code`) with KERAS_BACKEND=backend; returns its stdout."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    command = [sys.executable, "-c", code] if code is not None else [sys.executable, script, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"{backend} run failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def test_core_imports_no_tensorflow_on_jax():
    out = run_on(
        "jax",
        code=(
            "import sys, crn_tf.model, crn_tf.losses, crn_tf.vgg, crn_tf.layers, crn_tf.api, crn_tf.bundle\n"
            "import keras; print(keras.backend.backend(), 'tensorflow' in sys.modules)"
        ),
    )
    assert out.split() == ["jax", "False"]


@pytest.mark.slow
def test_tensorflow_and_jax_compute_the_same(tmp_path):
    """Outputs (inference, and training with TensorFlow's CPU convolution form), VGG-19 features, loss
    terms and every gradient agree, for the tiny preset and a paper-shaped 3-module network (paper3:
    k = 3, the class diversity loss; on JAX with --remat too). One process per backend."""
    work = str(tmp_path)
    assert "tensorflow imported: True" in run_on("tensorflow", "tiny,paper3", work, "tf", "--make_weights")
    assert "tensorflow imported: False" in run_on("jax", "tiny,paper3", work, "jax", "--remat=paper3")
    for config in ("tiny", "paper3"):
        a, b = np.load(f"{work}/tf_{config}.npz"), np.load(f"{work}/jax_{config}.npz")
        assert sorted(a.files) == sorted(b.files)
        assert sum(k.startswith("grad:") for k in a.files) == 20  # every trainable weight of 3 modules and the head
        for key in a.files:
            scale = np.abs(a[key]).max()
            # float32 round-off of other convolution algorithms and summation orders (oneDNN vs XLA:CPU,
            # TensorFlow's resize kernel vs the interpolation matrices): measured <= 1.5e-5 of each
            # tensor's largest magnitude; 1e-4 leaves room for other CPUs' kernels.
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-4 * scale, err_msg=f"{config} {key}")
            assert scale > 0 or key.startswith("term:"), f"{config} {key} is all zeros: the comparison would be empty"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    model = build_model(get_preset("tiny"))
    for v in model.weights:  # not the identity norms: every weight matters to the output
        v.assign(tf.random.stateless_normal(v.shape, seed=[len(v.path), 7]) * 0.5 + 0.1)
    model_dir = str(tmp_path_factory.mktemp("api") / "model")
    save_model_dir(model, model_dir, step=5)
    return model_dir, model


def test_bundle_reader_reads_what_tensorflow_reads(tiny_model_dir, tmp_path):
    model_dir, _ = tiny_model_dir
    prefix = f"{model_dir}/ckpt-5"
    reader, reference = BundleReader(prefix), tf.train.load_checkpoint(prefix)
    keys = [k for k in reader.tensor_names() if k.endswith("VARIABLE_VALUE")]
    assert len(keys) == 21  # 20 weights and the save counter
    for key in keys:
        np.testing.assert_array_equal(reader.read(key), reference.get_tensor(key), err_msg=key)  # bytes copied
    # A truncated data file and a file that is not an index are refused, naming the file.
    for name in os.listdir(model_dir):
        if "data" not in name:
            os.symlink(f"{model_dir}/{name}", tmp_path / name)
    data = f"{prefix}.data-00000-of-00001"
    with open(data, "rb") as f, open(tmp_path / os.path.basename(data), "wb") as g:
        g.write(f.read()[:100])
    truncated = BundleReader(str(tmp_path / "ckpt-5"))
    with pytest.raises(ValueError, match=r"data-00000-of-00001 \(100 bytes\): truncated or corrupt"):
        for key in keys:
            truncated.read(key)
    (tmp_path / "bad.index").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.index: not a TensorFlow checkpoint index"):
        BundleReader(str(tmp_path / "bad"))


def test_api_loads_a_model_dir_and_predicts_on_both_backends(tiny_model_dir, tmp_path):
    """ids and a colour PNG -> the same photos as the Keras model, on TensorFlow here and on JAX
    (without TensorFlow) in a subprocess."""
    model_dir, model = tiny_model_dir
    ids = random_ids([2, 16, 32], seed=3)
    space = get_preset("tiny").get_label_space()
    png = tmp_path / "layout.png"
    png.write_bytes(png_bytes(ids_to_colors(ids[0], space)))
    expected = np.round(np.clip(model(api.one_hot(ids, 19)).numpy(), 0, 255))

    crn = api.LayoutToPhoto.from_model_dir(model_dir)
    np.testing.assert_array_equal(crn.predict(ids), expected)  # the same weights and graph: exact
    np.testing.assert_array_equal(crn.predict(str(png)), expected[:1])
    with pytest.raises(ValueError, match="multiples of 4"):
        crn.predict(ids[:, :15])

    np.save(tmp_path / "ids.npy", ids)
    code = textwrap.dedent(f"""
        import sys, numpy as np, crn_tf
        crn = crn_tf.LayoutToPhoto.from_model_dir({model_dir!r})
        np.save({str(tmp_path / "jax.npy")!r}, np.concatenate([crn.predict(np.load({str(tmp_path / "ids.npy")!r})),
                                                     crn.predict({str(png)!r})]))
        print('tensorflow' in sys.modules)
        """)
    assert run_on("jax", code=code).split() == ["False"]
    on_jax = np.load(tmp_path / "jax.npy").astype(int)
    # Rounded to grey levels: float32 round-off (~1e-5) can move a value across a .5 boundary.
    assert np.abs(on_jax - np.concatenate([expected, expected[:1]])).max() <= 1


def test_api_errors_name_the_file(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not a crn_tf model_dir: crn_config.json not found"):
        api.load_model(str(tmp_path))
    model_dir, _ = tiny_model_dir
    with pytest.raises(ValueError, match=r"ckpt-9\.index not found"):
        api.load_model(f"{model_dir}/ckpt-9")


def test_readme_python_api_block(tiny_model_dir, tmp_path, monkeypatch):
    """The README's Python example runs as written, with a test model_dir in place of the quick start's."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## From Python", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model_dir, _ = tiny_model_dir
    assert '"/tmp/crn/tiny"' in block
    block = block.replace('"/tmp/crn/tiny"', repr(model_dir))
    monkeypatch.chdir(tmp_path)
    os.makedirs("examples")
    os.symlink(os.path.join(ROOT, "examples", "layouts"), "examples/layouts")
    namespace: dict = {}
    exec(compile(block, "README.md (From Python)", "exec"), namespace)
    assert namespace["photos"].dtype == np.uint8 and namespace["photos"].shape == (1, 256, 512, 3)
    assert (tmp_path / "photo.png").exists()


@pytest.mark.slow
def test_gpu_step_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/gpu_step.py at a tiny size on the CPU (so it cannot rot): every row timed, no TensorFlow."""
    out = tmp_path / "rows.json"
    # One size, precision and batch (one child process, one compilation: seconds each on 2 cores).
    args = ["--preset=tiny", "--sizes=16x32", "--precisions=mixed_bfloat16", "--batches=2"]
    args += ["--steps=1", "--warmup=0", f"--json_out={out}"]
    stdout = run_on("jax", *args, script=os.path.join(ROOT, "benchmarks", "gpu_step.py"))
    assert "| 16x32 | mixed_bfloat16 | 2 |" in stdout
    rows = json.loads(out.read_text())
    assert [(r["precision"], r["batch"]) for r in rows] == [("mixed_bfloat16", 2)]
    for r in rows:
        assert "error" not in r and r["images_per_s"] > 0 and r["tflop_per_step"] > 0, r
        assert r["tensorflow_imported"] is False and np.isfinite(r["loss"])


def test_api_reads_a_trainer_checkpoint_through_its_object_graph(tmp_path):
    """A trainer's checkpoint names the model's tensors by the optimizer's path to them
    (`optimizer/_trainable_variables/N`); the reader finds them through the object graph."""
    from crn_tf.experiment import TrainConfig
    from crn_tf.trainer import Trainer

    model_dir = str(tmp_path / "run")
    trainer = Trainer(get_preset("tiny"), TrainConfig(vgg_weights="none"), model_dir, log=lambda *a: None)
    try:
        trainer.initialize()
        for v in trainer.model.weights:
            v.assign(tf.random.stateless_normal(v.shape, seed=[len(v.path), 11]))
        trainer.save()
    finally:
        trainer.close()
    reader = BundleReader(f"{model_dir}/ckpt-0")
    assert not any(k.startswith("model/") for k in reader.tensor_names())  # named through the optimizer
    loaded = api.load_model(model_dir)
    for a, b in zip(loaded.weights, trainer.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # copied bytes: exact
