"""Importing the authors' TF1 checkpoints: the original generator is rebuilt here as a TF1 graph
(tf.compat.v1, graph mode) from the facts of the original code, saved with a TF1 Saver with Adam
slots (as the released files are), imported, and crn_tf's output compared with the graph's."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from crn_tf import convert_original
from crn_tf.config import CRNConfig, get_preset
from crn_tf.model import split_outputs
from crn_tf.model_dir import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CHANNELS = 20  # 19 Cityscapes classes + void, as in the released models


def _one_hot_layout(batch, height, width, seed):
    ids = np.random.default_rng(seed).integers(0, NUM_CHANNELS, size=(batch, height, width))
    return np.eye(NUM_CHANNELS, dtype=np.float32)[ids]  # [N, H, W, C]


def _original_generator(label, sp, widths, k, rng):
    """The original recursive_generator (demo_*.py), without slim: g_{sp}_conv1/2 + head at the top."""
    v1 = tf.compat.v1
    heights = sorted(widths)

    def variable(name, value):
        return v1.get_variable(name, initializer=tf.constant(value.astype(np.float32)))

    def conv_layer_norm_lrelu(x, width, scope):
        # slim.conv2d(x, width, [3, 3], normalizer_fn=slim.layer_norm, activation_fn=lrelu, scope=scope)
        with v1.variable_scope(scope):
            cin = x.shape[-1]
            w = variable("weights", rng.normal(0, np.sqrt(2.0 / (9 * cin)), (3, 3, cin, width)))
            x = tf.nn.conv2d(x, w, strides=[1, 1, 1, 1], padding="SAME")
            with v1.variable_scope("LayerNorm"):  # slim.layer_norm: moments over H, W, C; per-channel params
                beta = variable("beta", rng.normal(0, 0.3, (width,)))
                gamma = variable("gamma", rng.uniform(0.5, 1.5, (width,)))
                mean, var = tf.nn.moments(x, [1, 2, 3], keepdims=True)
                x = tf.nn.batch_normalization(x, mean, var, offset=beta, scale=gamma, variance_epsilon=1e-12)
            return tf.maximum(0.2 * x, x)

    if sp == heights[0]:
        x = label
    else:
        down = v1.image.resize_area(label, (sp // 2, sp), align_corners=False)
        prev = _original_generator(down, sp // 2, widths, k, rng)
        x = tf.concat([v1.image.resize_bilinear(prev, (sp, sp * 2), align_corners=True), label], 3)
    net = conv_layer_norm_lrelu(x, widths[sp], f"g_{sp}_conv1")
    net = conv_layer_norm_lrelu(net, widths[sp], f"g_{sp}_conv2")
    if sp == heights[-1]:
        with v1.variable_scope(f"g_{sp}_conv100"):
            w = variable("weights", rng.normal(0, np.sqrt(1.0 / widths[sp]), (1, 1, widths[sp], 3 * k)))
            b = variable("biases", rng.normal(0, 0.3, (3 * k,)))
            net = tf.nn.conv2d(net, w, strides=[1, 1, 1, 1], padding="SAME") + b
        net = (net + 1.0) / 2.0 * 255.0
        if k > 1:  # the original's channel order: image u = channels (u, u + k, u + 2k); batch of 1
            split0, split1, split2 = tf.split(tf.transpose(net, perm=[3, 1, 2, 0]), num_or_size_splits=3, axis=0)
            net = tf.concat([split0, split1, split2], 3)
    return net


def _save_original(directory, widths, k, batch, seed):
    """Builds, saves (TF1 Saver, Adam slots present) and runs the original generator.

    Returns (checkpoint prefix, layout, output): [N, H, W, 3] for k = 1, [k, H, W, 3] for k > 1.
    """
    rng = np.random.default_rng(seed)
    top = max(widths)
    layout = _one_hot_layout(batch, top, 2 * top, seed)
    with tf.Graph().as_default():
        v1 = tf.compat.v1
        label = v1.placeholder(tf.float32, [None, None, None, NUM_CHANNELS])
        generator = _original_generator(label, top, widths, k, rng)
        g_vars = [v for v in v1.trainable_variables() if v.name.startswith("g_")]
        v1.get_variable("step_counter", initializer=tf.constant(7))  # a non-generator variable
        v1.train.AdamOptimizer(learning_rate=1e-4).minimize(tf.reduce_mean(generator), var_list=g_vars)
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            output = sess.run(generator, feed_dict={label: layout})
            prefix = saver.save(sess, str(directory / "model.ckpt"))
    return prefix, layout, output


def _write_tf1_checkpoint(path, arrays):
    """A TF1 name-based checkpoint holding `arrays` ({name: value}) under their names."""
    with tf.Graph().as_default():
        variables = {
            n: tf.compat.v1.get_variable(n.replace("/", "_"), initializer=tf.constant(a)) for n, a in arrays.items()
        }
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return tf.compat.v1.train.Saver(variables).save(sess, str(path))


def _crn_images(model_dir, layout, num_outputs):
    """Loads an imported model_dir and runs it: [N, k, H, W, 3]."""
    model = load_model(str(model_dir))
    return split_outputs(model(tf.constant(layout)), num_outputs).numpy()


def _assert_close(actual, expected):
    assert actual.shape == expected.shape
    relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert relative < 1e-4, f"max relative difference {relative:.2e}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 modules (g_4 .. g_16) with the `tiny` preset's widths, k = 1, a batch of 2."""
    return _save_original(tmp_path_factory.mktemp("orig_small"), {4: 16, 8: 16, 16: 8}, k=1, batch=2, seed=1)


@pytest.fixture(scope="module")
def diverse(tmp_path_factory):
    """4 modules (g_4 .. g_32), unequal widths, a k = 9 head as in the released 256p models."""
    return _save_original(tmp_path_factory.mktemp("orig_k9"), {4: 16, 8: 16, 16: 12, 32: 8}, k=9, batch=1, seed=2)


def test_import_matches_original_graph(small, tmp_path):
    prefix, layout, expected = small
    result = convert_original.import_original(prefix, str(tmp_path / "out"))
    assert result.config.name == "imported_16p"
    assert result.config.widths == (16, 16, 8) and result.config.num_outputs == 1
    assert result.config.upsampling == "align_corners" and result.config.label_space == "cityscapes"
    assert result.matching_presets == ("tiny",)
    assert result.num_variables == 3 * 6 + 2
    _assert_close(_crn_images(tmp_path / "out", layout, 1)[:, 0], expected)


def test_import_k9_head_is_permuted(diverse, tmp_path):
    prefix, layout, expected = diverse
    # The checkpoint's directory works as well as its prefix.
    result = convert_original.import_original(os.path.dirname(prefix), str(tmp_path / "out"))
    assert result.config.name == "imported_32p"
    assert result.config.widths == (16, 16, 12, 8) and result.config.num_outputs == 9
    images = _crn_images(tmp_path / "out", layout, 9)  # [1, 9, H, W, 3]
    _assert_close(images[0], expected)  # the original's batch axis holds the k images


def test_head_permutation():
    np.testing.assert_array_equal(convert_original.head_permutation(1), [0, 1, 2])
    # image 0 = original channels (0, 2, 4), image 1 = (1, 3, 5)
    np.testing.assert_array_equal(convert_original.head_permutation(2), [0, 2, 4, 1, 3, 5])


def test_optimizer_slots_and_other_variables_are_ignored(small):
    original = convert_original.read_original_checkpoint(small[0])
    assert "g_4_conv1/weights/Adam" in original.ignored and "g_16_conv100/biases/Adam_1" in original.ignored
    assert {"beta1_power", "beta2_power", "step_counter"} <= set(original.ignored)
    config = convert_original.infer_config(original)
    assert config.num_classes == 19
    assert set(original.shapes) == set(convert_original.expected_shapes(config))


def test_preset_is_checked_and_kept(small, tmp_path):
    prefix, layout, expected = small
    result = convert_original.import_original(prefix, str(tmp_path / "out"), preset="tiny")
    assert result.config.name == "tiny"
    _assert_close(_crn_images(tmp_path / "out", layout, 1)[:, 0], expected)


def test_preset_mismatch_names_variable_and_shapes(diverse, tmp_path):
    with pytest.raises(ValueError, match="does not match preset 'tiny'") as e:
        convert_original.import_original(diverse[0], str(tmp_path / "out"), preset="tiny")
    message = str(e.value)
    assert "g_16_conv1/weights: checkpoint has shape [3, 3, 36, 12], expected [3, 3, 36, 8]" in message
    assert "g_32_conv1/weights: in the checkpoint" in message
    assert "widths [16, 16, 12, 8], k=9" in message  # what it looks like instead
    assert not (tmp_path / "out").exists()


def test_not_a_crn_checkpoint(tmp_path):
    prefix = _write_tf1_checkpoint(tmp_path / "other.ckpt", {"dense/kernel": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="not a CRN generator checkpoint.*dense/kernel"):
        convert_original.import_original(prefix, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="not a TF checkpoint"):
        convert_original.import_original(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_variable(small, tmp_path):
    reader = tf.train.load_checkpoint(small[0])
    arrays = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if "Adam" not in n}
    del arrays["g_8_conv2/LayerNorm/gamma"]
    prefix = _write_tf1_checkpoint(tmp_path / "partial.ckpt", arrays)
    missing = r"g_8_conv2/LayerNorm/gamma: missing from the checkpoint \(expected shape \[16\]\)"
    with pytest.raises(ValueError, match=missing):
        convert_original.import_original(prefix, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="g_8_conv2/LayerNorm/gamma: missing"):
        convert_original.import_original(prefix, str(tmp_path / "out"), preset="tiny")
    assert not (tmp_path / "out").exists()


def test_existing_model_dir_needs_overwrite(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        convert_original.import_original(small[0], str(out))
    assert (out / "keep.txt").exists()
    convert_original.import_original(small[0], str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "crn_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left


def test_failure_while_writing_leaves_nothing(small, tmp_path, monkeypatch):
    def failing_save(model, model_dir, step=0):
        tf.io.gfile.makedirs(model_dir)
        tf.io.gfile.GFile(f"{model_dir}/crn_config.json", "w").write("{}")
        raise OSError("disk full")

    monkeypatch.setattr(convert_original, "save_model_dir", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_original.import_original(small[0], str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "crn_tf.import_original_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli(small, tmp_path):
    prefix, layout, expected = small
    out = tmp_path / "out"
    done = _cli(f"--checkpoint={prefix}", f"--model_dir={out}", "--preset=tiny")
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout and "widths [16, 16, 8]" in done.stdout
    _assert_close(_crn_images(out, layout, 1)[:, 0], expected)

    failed = _cli(f"--checkpoint={prefix}", f"--model_dir={tmp_path / 'other'}", "--preset=cityscapes_512p")
    assert failed.returncode != 0
    assert "does not match preset 'cityscapes_512p'" in failed.stderr
    assert "g_4_conv1/weights: checkpoint has shape [3, 3, 20, 16], expected [3, 3, 20, 1024]" in failed.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "preset, shapes, millions",
    [
        # Shapes from the original demo scripts' recursive_generator; parameter counts as read from
        # the released checkpoints (reference/original_crn.md).
        ("cityscapes_256p", {"g_4_conv1/weights": (3, 3, 20, 1024), "g_256_conv100/weights": (1, 1, 512, 27)}, 97.9),
        ("cityscapes_512p", {"g_512_conv1/weights": (3, 3, 532, 128), "g_512_conv100/biases": (3,)}, 98.6),
        ("cityscapes_1024p", {"g_1024_conv1/weights": (3, 3, 148, 32), "g_1024_conv100/weights": (1, 1, 32, 3)}, 98.7),
        # GTA_Diversity_256p.py: the GTA model has the same 27-channel (k = 9) head as the 256p one.
        ("gta_256p", {"g_128_conv1/weights": (3, 3, 1044, 512), "g_256_conv100/biases": (27,)}, 97.9),
    ],
)
def test_release_presets_match_the_original_variables(preset, shapes, millions):
    expected = convert_original.expected_shapes(get_preset(preset))
    assert len(expected) == 6 * get_preset(preset).num_modules + 2
    for name, shape in shapes.items():
        assert expected[name] == shape
    assert round(sum(np.prod(s) for s in expected.values()) / 1e6, 1) == millions


def test_checkpoint_directory_without_usable_state_file(small, tmp_path):
    # As downloaded: model.ckpt.{index,data} in result_*/, with no `checkpoint` file or one naming
    # the authors' own paths.
    for f in pathlib.Path(small[0]).parent.glob("model.ckpt.*"):
        if not f.name.endswith(".meta"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    assert convert_original.resolve_checkpoint(str(tmp_path)) == f"{tmp_path}/model.ckpt"
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/home/author/result_512p/model.ckpt"\n')
    assert convert_original.resolve_checkpoint(str(tmp_path)) == f"{tmp_path}/model.ckpt"
    assert len(convert_original.read_original_checkpoint(str(tmp_path)).shapes) == 20


def test_label_space_is_inferred_from_the_number_of_classes(tmp_path):
    def checkpoint(name, num_classes):
        config = CRNConfig(label_space="custom.json", num_classes=num_classes, widths=(4, 4))
        arrays = {n: np.ones(s, np.float32) for n, s in convert_original.expected_shapes(config).items()}
        return convert_original.read_original_checkpoint(_write_tf1_checkpoint(tmp_path / name, arrays))

    assert convert_original.infer_config(checkpoint("nyu.ckpt", 40)).label_space == "nyu40"
    four = checkpoint("four.ckpt", 4)
    with pytest.raises(ValueError, match="4 classes \\+ void, which no built-in label space has"):
        convert_original.infer_config(four)
    config = convert_original.infer_config(four, label_space="palettes/four.json")
    assert (config.label_space, config.num_classes, config.widths, config.name) == (
        "palettes/four.json",
        4,
        (4, 4),
        "imported_8p",
    )


@pytest.mark.slow
def test_imported_model_exports_and_serves_what_the_original_computed(diverse, tmp_path):
    """Original TF1 graph -> crn-import-original -> crn-export (verified with TF Serving's loader) ->
    serving_default on label ids: the same k = 9 images as the original graph, within 1 grey level."""
    prefix, layout, expected = diverse  # expected: [k, H, W, 3] for the batch of 1
    convert_original.import_original(prefix, str(tmp_path / "model"))
    export = subprocess.run(
        [sys.executable, "-m", "export.export_saved_model", f"--model_dir={tmp_path / 'model'}",
         f"--export_base={tmp_path / 'exports/crn'}"],
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
    )  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    serving = tf.saved_model.load(str(tmp_path / "exports/crn/1")).signatures["serving_default"]
    ids = np.argmax(layout, axis=-1).astype(np.uint8)  # channel 19 (void) -> id 19 >= 19 classes = void
    images = serving(label_ids=tf.constant(ids))["images"].numpy()  # [1, k, H, W, 3] uint8
    want = np.clip(np.round(expected), 0, 255)
    assert images.shape == (1, 9) + want.shape[1:]
    assert np.abs(images[0].astype(np.int32) - want).max() <= 1
