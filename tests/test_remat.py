"""--remat (recomputed activations), the split conv1 and the CPU form of the 3x3 convolution: each must
compute what the plain step computes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import random_layout

from crn_tf.config import LEAKY_RELU_SLOPE, get_preset
from crn_tf.layers import RefinementModule
from crn_tf.model import build_model
from crn_tf.ops import bilinear_upsample
from crn_tf.tf_ops import conv3x3_as_backprop_input, onednn_cpu_only
from crn_tf.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def _gradients(tmp_path, remat: bool, num_outputs: int):
    """One replica's gradients of the tiny preset (k outputs) on a fixed batch, and the traced graph."""
    config = get_preset("tiny", num_outputs=num_outputs)
    train_config = TrainConfig(batch_size=2, vgg_weights="none", strategy="one_device", remat=remat)
    trainer = Trainer(config, train_config, str(tmp_path / f"remat{remat}"), log=lambda *a, **k: None)
    batch = {
        "layout": tf.constant(random_layout([2, 16, 32], seed=3)),
        "image": tf.random.stateless_uniform([2, 16, 32, 3], seed=[1, 2], maxval=255.0),
    }
    fn = tf.function(trainer._replica_gradients)
    grads, terms = fn(batch)
    graph = fn.get_concrete_function(batch).graph
    names = [v.path for v in trainer.model.trainable_variables]
    trainer.close()
    return names, [g.numpy() for g in grads], float(terms["total"]), graph


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_remat_gives_the_same_gradients(tmp_path, num_outputs):
    names, plain, loss, plain_graph = _gradients(tmp_path, False, num_outputs)
    remat_names, remat, remat_loss, remat_graph = _gradients(tmp_path, True, num_outputs)
    assert remat_names == names and len(plain) == len(names)

    # Remat really recomputes: the backward pass runs the modules' and VGG blocks' convolutions again
    # (any of the three convolution ops: on CPUs the modules' forward ones are Conv2DBackpropInput).
    def convs(graph):
        return sum(1 for op in graph.get_operations() if op.type.startswith("Conv2D")) + sum(
            sum(1 for op in f.graph.get_operations() if op.type.startswith("Conv2D"))
            for f in graph._functions.values()
            if hasattr(f, "graph")
        )

    assert convs(remat_graph) > convs(plain_graph)
    # The same ops on the same inputs; multi-threaded CPU kernels may sum in another order, so allow
    # float32 round-off (1e-5 of each gradient's largest magnitude), far below any real difference.
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    for name, a, b in zip(names, plain, remat):
        assert np.abs(a).max() > 0, name
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=name)


def test_split_conv1_is_the_concatenated_convolution():
    """conv1 as two summed convolutions computes conv1 over [features, layout] with the same kernel."""
    module = RefinementModule(8, name="module_8x16")
    layout = tf.constant(random_layout([2, 8, 16], seed=1))
    features = tf.random.stateless_normal([2, 4, 8, 16], seed=[0, 1])
    module(layout, features)  # builds
    assert module.conv1.kernel.shape == (3, 3, 16 + 20, 8)  # one kernel, as in checkpoints and imports
    tf.random.set_seed(0)
    for v in (module.norm1.gamma, module.norm1.beta):  # not the identity init, so the norms' order matters
        v.assign(tf.random.normal(v.shape))
    out = module(layout, features)
    x = tf.concat([bilinear_upsample(features, [8, 16]), layout], axis=-1)  # the original's order
    x = tf.nn.leaky_relu(module.norm1(module.conv1(x)), LEAKY_RELU_SLOPE)
    expected = tf.nn.leaky_relu(module.norm2(module.conv2(x)), LEAKY_RELU_SLOPE)
    # Two convolutions summed vs one: float32 round-off of a different summation order only.
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("channels", [(12, 5), (128, 144)], ids=["conv_filter_gradient", "matmul_filter_gradient"])
def test_conv3x3_as_backprop_input_is_conv2d_with_its_gradients(dtype, channels):
    """The convolution computed as an input gradient: the same outputs and the same gradients; with
    128 and more channels on both sides the kernel gradient is nine matrix products, traced here with
    unknown height and width (the batch's images and borders must not mix)."""
    c_in, c_out = channels
    x = tf.random.stateless_normal([2, 6, 10, c_in], seed=[0, 1], dtype=dtype)
    kernel = tf.random.stateless_normal([3, 3, c_in, c_out], seed=[0, 2], dtype=dtype)
    dy = tf.random.stateless_normal([2, 6, 10, c_out], seed=[0, 3], dtype=dtype)

    def outputs_and_gradients(x, kernel, dy, fast):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv3x3_as_backprop_input(x, kernel) if fast else tf.nn.conv2d(x, kernel, 1, "SAME")
        return [y, *tape.gradient(y, [x, kernel], output_gradients=dy)]

    spec = [tf.TensorSpec([None, None, None, c_in], dtype), tf.TensorSpec(kernel.shape, dtype)]
    fast_step = tf.function(lambda x, k, dy: outputs_and_gradients(x, k, dy, True))
    graph = fast_step.get_concrete_function(*spec, tf.TensorSpec([None, None, None, c_out], dtype)).graph
    op_types = {op.type for op in graph.get_operations()}
    op_types |= {node.op for f in graph.as_graph_def().library.function for node in f.node_def}
    if c_in >= 128:
        assert "MatMul" in op_types and "Conv2DBackpropFilter" not in op_types, sorted(op_types)
    else:
        assert "Conv2DBackpropFilter" in op_types and "MatMul" not in op_types, sorted(op_types)
    results = [outputs_and_gradients(x, kernel, dy, False), fast_step(x, kernel, dy)]
    # A different kernel may sum in another order: float32 round-off (1e-5 of each tensor's largest
    # magnitude); float64 shows the two are the same function (1e-12).
    atol = 1e-5 if dtype == "float32" else 1e-12
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), *results):
        assert b.shape == a.shape, name
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=atol * np.abs(a.numpy()).max(), err_msg=name)


def test_training_step_uses_the_cpu_convolution_form_with_the_same_result():
    """In training on CPUs with oneDNN the modules' feature convolutions run as input gradients
    (Conv2DBackpropInput in the forward pass), with the outputs of the Keras layers."""
    model = build_model(get_preset("tiny"))
    layout = tf.constant(random_layout([2, 16, 32], seed=5))
    for module in model.refinement_modules:  # not the identity init, so the norms' place matters
        for v in (module.norm1.gamma, module.norm1.beta, module.norm2.gamma, module.norm2.beta):
            v.assign(tf.random.stateless_normal(v.shape, seed=[len(v.path), 1]))
    trained = tf.function(lambda x: model(x, training=True))
    graph = trained.get_concrete_function(layout).graph
    ops = {op.type for op in graph.get_operations()}
    ops |= {op.type for f in graph._functions.values() if hasattr(f, "graph") for op in f.graph.get_operations()}
    assert ("Conv2DBackpropInput" in ops) == onednn_cpu_only()  # True on x86 CPUs (TensorFlow's default)
    # float32 round-off of another summation order, carried through the cascade: 1e-5 of the largest value.
    expected = model(layout, training=False).numpy()
    np.testing.assert_allclose(trained(layout).numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


ONEDNN_STEP = """
import tempfile, numpy as np, tensorflow as tf
from crn_tf.config import get_preset
from crn_tf.train import Trainer, TrainConfig
for remat in (False, True):
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(get_preset("tiny"), TrainConfig(batch_size=1, vgg_weights="none", remat=remat), d, log=print)
        layout = tf.one_hot(np.random.default_rng(0).integers(0, 20, [1, 16, 32]), 20)
        batch = {"layout": layout, "image": tf.random.uniform([1, 16, 32, 3], 0, 255)}
        it = iter(t.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
        float(t.train_step(it)[0]["total"])
"""


@pytest.mark.skipif(not onednn_cpu_only(), reason="TensorFlow runs its convolutions with oneDNN on x86 CPUs only")
@pytest.mark.parametrize("isa", ["AVX2", "native"])
def test_training_runs_no_3x3_convolution_as_onednn_forward(isa):
    """Every 3x3 convolution of a training step (the modules', the layout's, VGG-19's), plain and with
    --remat, runs as oneDNN's input-gradient convolution, never as its forward one: on CPUs without
    AVX-512 oneDNN's forward convolution is an im2col GEMM (scratchpad 9x its input: 4.8 GB for VGG's
    block1_conv2 at 1024x2048) or its reference kernel, which made the 1024p step need 23 GB there.
    ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN pick the kernels of such a CPU; ONEDNN_VERBOSE lists each
    primitive it runs."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run(
        [sys.executable, "-c", ONEDNN_STEP], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [line.split(",") for line in out.stdout.splitlines() if line.startswith("onednn_verbose,v1,primitive,exec")]
    convolutions = [r for r in runs if r[5] == "convolution"]
    three = [r for r in convolutions if "kh3" in r[-2]]
    assert len(three) > 100, f"expected the step's 3x3 convolutions in oneDNN's log, got {len(three)}"
    forward = sorted({r[-2] for r in three if r[7].startswith("forward")})
    assert not forward, f"3x3 convolutions run as oneDNN forward convolutions: {forward}"
    slow = sorted({(r[6], r[-2]) for r in three if "gemm" in r[6] or r[6].startswith("ref")})
    assert not slow, f"3x3 convolutions run as GEMM or reference kernels: {slow}"
