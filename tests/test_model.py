import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_layout

from crn_tf.config import get_preset
from crn_tf.layers import RefinementModule
from crn_tf.model import CascadedRefinementNetwork, split_outputs
from crn_tf.model_dir import load_model, save_model_dir
from crn_tf.ops import area_downsample, bilinear_upsample


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(1)
    return CascadedRefinementNetwork(get_preset("tiny"))


def test_one_instance_runs_at_two_sizes(tiny):
    assert tiny(random_layout([2, 16, 32])).shape == (2, 16, 32, 3)
    assert tiny(random_layout([1, 32, 48])).shape == (1, 32, 48, 3)  # 48 = 12 * 4: any multiple works
    diverse = CascadedRefinementNetwork(get_preset("tiny", num_outputs=3))
    out = diverse(random_layout([1, 16, 32]))
    assert out.shape == (1, 16, 32, 9)
    assert split_outputs(out, 3).shape == (1, 3, 16, 32, 3)
    np.testing.assert_array_equal(split_outputs(out, 3)[:, 1], out[..., 3:6])


def test_layer_names_are_stable_and_by_scale(tiny):
    paths = [v.path for v in tiny.weights]
    assert "crn/module_4x8/conv1/kernel" in paths and "crn/module_16x32/norm2/gamma" in paths
    assert "crn/head/conv/bias" in paths
    assert not any("bias" in p for p in paths if "/conv1/" in p or "/conv2/" in p)  # no conv bias
    assert tiny.count_params() == get_preset("tiny").num_parameters()


def test_invalid_sizes_and_channels_are_refused(tiny):
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny(random_layout([1, 18, 32]))
    with pytest.raises(ValueError, match="expects 20"):
        tiny(tf.zeros([1, 16, 32, 5]))
    fn = tf.function(tiny).get_concrete_function(tf.TensorSpec([None, None, None, 20]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 4"):
        fn(tf.zeros([1, 16, 30, 20]))


def test_group_norm_module_equals_hand_written_layer_norm():
    keras.utils.set_random_seed(2)
    module = RefinementModule(6, name="m")
    layout = random_layout([2, 8, 16], seed=3)
    features = tf.random.normal([2, 4, 8, 5])
    module.build(layout.shape, features.shape)
    for norm in (module.norm1, module.norm2):  # non-trivial scale and offset
        norm.gamma.assign(np.random.uniform(0.5, 2, 6))
        norm.beta.assign(np.random.uniform(-1, 1, 6))
    got = module(layout, features).numpy()

    def by_hand(x, conv, norm):
        x = tf.nn.conv2d(x, conv.kernel, 1, "SAME").numpy()
        mean = x.mean(axis=(1, 2, 3), keepdims=True)  # over H, W and C of each sample
        var = x.var(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) / np.sqrt(var + 1e-12) * norm.gamma.numpy() + norm.beta.numpy()
        return np.maximum(0.2 * x, x)

    up = tf.compat.v1.image.resize_bilinear(features, [8, 16], align_corners=True)
    x = by_hand(tf.concat([up, layout], -1), module.conv1, module.norm1)
    want = by_hand(x, module.conv2, module.norm2)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _dilate(mask, r):
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = np.zeros_like(mask)
            shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
                max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
            ]
            out |= shifted
    return out


def test_a_layout_change_stays_inside_the_receptive_field():
    # Layer norm couples every pixel through its statistics, so locality is a property of the
    # cascade's wiring: checked with normalization="none".
    config = get_preset("tiny", widths=(8, 8, 8, 8), normalization="none")  # 32x64 native
    keras.utils.set_random_seed(4)
    model = CascadedRefinementNetwork(config)
    ids = np.zeros([1, 32, 64], np.int32)
    changed = ids.copy()
    y, x = 3, 5
    changed[0, y, x] = 7
    diff = np.abs(model(tf.one_hot(changed, 20)) - model(tf.one_hot(ids, 20))).sum(-1)[0]

    # Expected receptive field: at each module the changed cell of the area-downsampled layout,
    # plus the previous field upsampled, grown by 2 cells (two 3x3 convolutions).
    field = None
    for i in range(config.num_modules):
        scale = 2 ** (config.num_modules - 1 - i)
        h, w = 32 // scale, 64 // scale
        cell = np.zeros((h, w), bool)
        cell[y // scale, x // scale] = True
        if field is not None:
            up = bilinear_upsample(tf.constant(field, tf.float32)[None, ..., None], [h, w]).numpy()[0, ..., 0]
            cell |= up > 0
        field = _dilate(cell, 2)
    assert diff[y, x] > 1e-2
    # Outside the field the two outputs come from identical inputs; they may still differ in the last bits,
    # as multi-threaded convolutions need not sum in the same order twice. A real leak of the changed pixel
    # would be of the order of the change itself, so 1e-4 of the largest difference separates the two.
    assert diff[~field].max() <= 1e-4 * diff.max()
    assert (~field).sum() > 0.25 * field.size  # the test means something: a good part lies outside


def test_resampling_ops():
    x = tf.random.uniform([1, 8, 16, 3])
    np.testing.assert_allclose(area_downsample(x), tf.image.resize(x, [4, 8], method="area"), atol=1e-6)
    up = bilinear_upsample(x, [16, 32], "align_corners").numpy()
    np.testing.assert_allclose(up[0, [0, -1]][:, [0, -1]], x.numpy()[0, [0, -1]][:, [0, -1]], atol=1e-6)
    half = bilinear_upsample(x, [16, 32], "half_pixel")
    assert np.abs(half - up).max() > 1e-3
    assert bilinear_upsample(tf.cast(x, tf.float16), [16, 32]).dtype == tf.float16


def test_keras_and_checkpoint_round_trips(tiny, tmp_path):
    layout = random_layout([1, 16, 32], seed=5)
    path = str(tmp_path / "tiny.keras")
    tiny.save(path)
    want = tiny(layout).numpy()

    def same_model(loaded):
        # The weights round-trip exactly; outputs of two calls agree to float32 rounding (multi-threaded
        # kernels may sum in another order; outputs are O(100), so 1e-3 absolute is ~1e-5 relative).
        for a, b in zip(loaded.weights, tiny.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        np.testing.assert_allclose(loaded(layout), want, rtol=1e-5, atol=1e-3)

    same_model(keras.models.load_model(path))
    same_model(load_model(path))
    model_dir = str(tmp_path / "model")
    assert save_model_dir(tiny, model_dir, step=7).endswith("ckpt-7")
    same_model(load_model(model_dir))
    assert CascadedRefinementNetwork.from_config(tiny.get_config()).crn_config == tiny.crn_config
    with pytest.raises(ValueError, match="not a crn_tf model_dir"):
        load_model(str(tmp_path))
