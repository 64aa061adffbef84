import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_layout

from crn_tf import config as cfg
from crn_tf.losses import CRNLoss, build_loss
from crn_tf.vgg import VGGFeatures


@pytest.fixture(scope="module")
def vgg():
    return VGGFeatures(weights="none")


def _images(n=2, seed=0, k=1):
    return tf.random.stateless_uniform([n, 16, 32, 3 * k], seed=[seed, 1], maxval=255.0)


def test_vgg_features_are_frozen_avg_pooled_and_deterministic(vgg):
    assert not vgg.trainable_weights and len(vgg.weights) == 2 * 14  # 14 convs up to block5_conv2
    feats = vgg(_images())
    assert [f.shape[1:] for f in feats] == [
        (16, 32, 3),
        (16, 32, 64),
        (8, 16, 128),
        (4, 8, 256),
        (2, 4, 512),
        (1, 2, 512),
    ]
    assert "AveragePooling2D" in {type(layer).__name__ for _, layer in vgg._plan}
    # Seeded: a second VGG has the same weights exactly; its features agree to float32 rounding (multi-threaded
    # convolutions may sum in another order from call to call, ~1e-6 relative over 16 layers).
    again = VGGFeatures(weights="none")
    for a, b in zip(again.weights, vgg.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(again(_images())[-1], feats[-1], rtol=1e-4, atol=1e-4 * np.abs(feats[-1]).max())


def test_vgg_from_a_local_keras_weights_file_matches_keras_vgg19(tmp_path):
    keras.utils.set_random_seed(0)
    reference = keras.applications.VGG19(include_top=False, weights=None, input_shape=(None, None, 3))
    path = str(tmp_path / "vgg19_notop.weights.h5")
    reference.save_weights(path)
    ours = VGGFeatures(weights=path, pooling="max")
    images = _images()
    want = keras.Model(reference.input, reference.get_layer("block5_conv2").output)(
        keras.applications.vgg19.preprocess_input(images.numpy())  # caffe: RGB -> BGR minus mean
    )
    np.testing.assert_allclose(ours(images)[-1], want, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="missing.h5 does not exist"):
        VGGFeatures(weights=str(tmp_path / "missing.h5"))


def test_perceptual_loss_is_zero_for_identical_images_and_positive_otherwise(vgg):
    loss = CRNLoss(layer_weights=cfg.LAYER_WEIGHTS_256P, feature_extractor=vgg)
    real = _images(seed=1)
    same = loss(real, real)
    assert set(same) == {"total", *cfg.LOSS_LAYERS}
    for name, value in same.items():
        # Zero up to float32 rounding: the two images' features come from one batched VGG call, where
        # multi-threaded kernels may sum in another order per example (a real difference is > 1, see below).
        np.testing.assert_allclose(value, np.zeros(2), atol=1e-5, err_msg=name)
    other = loss(real, _images(seed=2))
    for name in ("total", "image", "block1_conv2", "block3_conv2"):
        assert np.all(other[name].numpy() > 0), name


def test_perceptual_loss_value_by_hand(vgg):
    weights = cfg.LAYER_WEIGHTS_512P
    loss = CRNLoss(layer_weights=weights, feature_extractor=vgg)
    real, fake = _images(seed=3), _images(seed=4)
    got = loss(real, fake)["total"].numpy()
    want = sum(w * np.abs(r.numpy() - f.numpy()).mean(axis=(1, 2, 3)) for w, r, f in zip(weights, vgg(real), vgg(fake)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _two_class_case():
    """Left half class 0, right half class 1. Output 0 is right on the left, output 1 on the right."""
    ids = np.zeros([1, 16, 32], np.int32)
    ids[:, :, 16:] = 1
    layout = tf.one_hot(ids, 3)  # 2 classes + void (empty)
    real = tf.zeros([1, 16, 32, 3])
    left = np.zeros([1, 16, 32, 3], np.float32)
    left[:, :, 16:] = 10.0
    right = np.zeros([1, 16, 32, 3], np.float32)
    right[:, :, :16] = 10.0
    return real, tf.concat([left, right], -1), layout


def test_class_diversity_loss_takes_the_best_output_per_class():
    real, fake, layout = _two_class_case()
    loss = CRNLoss(kind="image", num_outputs=2, diversity="class")
    got = loss(real, fake, layout)
    # Per class p and output u: mean over all pixels of mask_p * |diff|; class 0 and 1 cover half
    # the image each: content = [[0, 5, 0], [5, 0, 0]] (u x p). Minima over u: 0, 0, 0; means: 2.5, 2.5, 0.
    np.testing.assert_allclose(got["total"], [0.999 * 0 + 0.001 * (2.5 + 2.5)], rtol=1e-6)
    np.testing.assert_allclose(got["image"], [0.0], atol=1e-6)  # the assembled best image is exact
    # Eq. 2 can only pick one whole image: 5 either way.
    whole = CRNLoss(kind="image", num_outputs=2, diversity="image")(real, fake, layout)
    np.testing.assert_allclose(whole["total"], [0.999 * 5 + 0.001 * 5], rtol=1e-6)


def test_class_diversity_with_the_perceptual_loss_runs_on_k_outputs(vgg):
    loss = CRNLoss(num_outputs=3, layer_weights=cfg.LAYER_WEIGHTS_256P, feature_extractor=vgg)
    layout = random_layout([2, 16, 32], seed=6)
    real = _images(seed=5)
    fake = tf.concat([real, _images(seed=7), _images(seed=8)], -1)  # output 0 is perfect
    out = loss(real, fake, layout)
    assert out["total"].shape == (2,) and np.all(out["total"].numpy() > 0)  # the 0.001 mean term
    for name in cfg.LOSS_LAYERS:
        np.testing.assert_allclose(out[name], 0.0, atol=1e-5)  # the best per class is output 0


def test_image_space_loss_and_rebalancing():
    loss = CRNLoss(kind="image", layer_weights=cfg.LAYER_WEIGHTS_256P)
    real, fake = _images(seed=9), _images(seed=10)
    out = loss(real, fake)
    assert set(out) == {"total", "image"}
    np.testing.assert_allclose(out["total"], np.abs(real - fake).mean(axis=(1, 2, 3)), rtol=1e-6)

    auto = CRNLoss(kind="perceptual", feature_extractor=VGGFeatures(weights="none"))
    np.testing.assert_array_equal(auto.layer_weights.numpy(), np.ones(6))  # initial value 1/numel of the L1 mean, set
    auto.accumulate({name: tf.fill([2], float(i + 1)) for i, name in enumerate(cfg.LOSS_LAYERS)})
    auto.accumulate({name: tf.fill([2], 3.0 * (i + 1)) for i, name in enumerate(cfg.LOSS_LAYERS)})
    auto.rebalance()
    np.testing.assert_allclose(auto.layer_weights.numpy(), [1 / (2.0 * (i + 1)) for i in range(6)], rtol=1e-6)
    assert bool(auto.rebalanced.numpy()) and float(auto.term_count.numpy()) == 0  # reset to 0, exact


def test_build_loss_uses_the_preset_weights():
    loss = build_loss(cfg.get_preset("tiny"), kind="image")
    np.testing.assert_allclose(loss.layer_weights.numpy(), [1.0])
    loss = build_loss(cfg.get_preset("gta_256p"), vgg_weights="none")
    np.testing.assert_allclose(loss.layer_weights.numpy(), cfg.LAYER_WEIGHTS_GTA_256P, rtol=1e-6)
    with pytest.raises(ValueError, match="needs 6 layer weights"):
        CRNLoss(layer_weights=[1.0], feature_extractor=VGGFeatures(weights="none"))
