import math

import numpy as np
import pytest

from crn_tf import metrics
from crn_tf.config import LAYER_WEIGHTS_256P
from crn_tf.losses import CRNLoss
from crn_tf.vgg import VGGFeatures


def random_images(n, height=16, width=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, [n, height, width, 3]).astype(np.float32)


def test_l1_and_psnr_of_a_known_error():
    reference = random_images(2)
    synthesized = reference.copy()
    synthesized[0] += 5.0  # every value off by 5
    synthesized[1, :, :, 0] -= 12.0  # one channel of three off by 12: mean 4, mse 48
    np.testing.assert_allclose(metrics.l1(synthesized, reference).numpy(), [5.0, 4.0], rtol=1e-5)
    expected_psnr = [20 * math.log10(255 / 5), 10 * math.log10(255**2 / 48)]  # 34.15 dB, 31.32 dB
    np.testing.assert_allclose(metrics.psnr(synthesized, reference).numpy(), expected_psnr, rtol=1e-5)
    # Exact: x - x is 0 in IEEE arithmetic whatever the summation order, so the MSE is 0 and PSNR inf.
    assert metrics.psnr(reference, reference).numpy().tolist() == [math.inf, math.inf]


def test_ssim_identical_and_constant_images():
    reference = random_images(2)
    np.testing.assert_allclose(metrics.ssim(reference, reference).numpy(), [1.0, 1.0], rtol=1e-6)
    # Two constant images a, b: no structure or contrast, so SSIM is the luminance term alone,
    # (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2.
    a, b = 20.0, 50.0
    c1 = (0.01 * 255) ** 2
    value = metrics.ssim(np.full([1, 16, 32, 3], a, np.float32), np.full([1, 16, 32, 3], b, np.float32))
    # rtol: TF computes variances as E[x^2] - E[x]^2 in float32, ~1e-3 off 0 next to C2 = 58.5.
    np.testing.assert_allclose(value.numpy(), [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-4)
    assert metrics.ssim(reference, random_images(2, seed=1)).numpy().max() < 0.1


def test_ssim_window_shrinks_on_small_images():
    assert metrics.ssim_window(16, 32) == (11, 1.5)
    assert metrics.ssim_window(8, 64) == (7, pytest.approx(1.5 * 7 / 11))
    assert metrics.ssim_window(6, 6)[0] == 5
    small = random_images(2, 8, 8)
    np.testing.assert_allclose(metrics.ssim(small, small).numpy(), [1.0, 1.0], rtol=1e-6)  # 11x11 would not fit
    assert metrics.ssim(small, random_images(2, 8, 8, seed=3)).numpy().max() < 0.5


def test_perceptual_distance_is_the_papers_eq1():
    vgg = VGGFeatures(weights="none")
    reference, synthesized = random_images(2), random_images(2, seed=1)
    value = metrics.perceptual_distance(synthesized, reference, vgg, LAYER_WEIGHTS_256P)
    loss = CRNLoss("perceptual", layer_weights=LAYER_WEIGHTS_256P, feature_extractor=vgg)
    np.testing.assert_allclose(value.numpy(), loss(reference, synthesized)["total"].numpy(), rtol=1e-5)
    # Weight on the image term alone: the distance is L1.
    image_only = metrics.perceptual_distance(synthesized, reference, vgg, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(image_only.numpy(), metrics.l1(synthesized, reference).numpy(), rtol=1e-5)
    # Zero up to float32 rounding: multi-threaded kernels are not bit-deterministic, so the same image's
    # features may differ in the last bits between the two halves of the batch (seen: 5.6e-8).
    np.testing.assert_allclose(metrics.perceptual_distance(reference, reference, vgg).numpy(), [0.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="6 layer weights"):
        metrics.perceptual_distance(synthesized, reference, vgg, [1.0])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # Commuting covariances (same eigenvectors): the same formula on the eigenvalues.
    rotation, _ = np.linalg.qr(rng.normal(size=[d, d]))
    r1, r2 = rotation @ np.diag(s1) @ rotation.T, rotation @ np.diag(s2) @ rotation.T
    assert metrics.frechet_distance(mu1, r1, mu2, r2) == pytest.approx(expected, rel=1e-8)
    # General covariances: tr(sqrt(S1 S2)) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2.
    a, b = rng.normal(size=[d, d]), rng.normal(size=[d, d])
    g1, g2 = a @ a.T, b @ b.T
    trace_sqrt = np.sum(np.sqrt(np.abs(np.linalg.eigvals(g1 @ g2))))
    general = np.sum((mu1 - mu2) ** 2) + np.trace(g1) + np.trace(g2) - 2 * trace_sqrt
    assert metrics.frechet_distance(mu1, g1, mu2, g2) == pytest.approx(general, rel=1e-8)
    assert metrics.frechet_distance(mu2, g2, mu1, g1) == pytest.approx(general, rel=1e-8)
    # One dimension: (mu1 - mu2)^2 + (sigma1 - sigma2)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_of_few_samples_is_stable():
    # Fewer samples than dimensions: singular covariances, where a general sqrtm goes complex.
    features = np.random.default_rng(1).normal(size=[10, 64])
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.fid(features, features + 2.0)
    assert shifted == pytest.approx(64 * 4.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        metrics.fid(features[:1], features)


def test_inception_weights_are_only_found_on_disk(tmp_path):
    path, note = metrics.find_inception_weights(cache_dirs=[str(tmp_path)])
    assert path is None and "FID skipped" in note and "--inception_weights" in note
    cached = tmp_path / metrics.INCEPTION_NOTOP_FILENAME
    cached.write_bytes(b"")
    assert metrics.find_inception_weights(cache_dirs=[str(tmp_path)])[0] == str(cached)
    with pytest.raises(ValueError, match="--inception_weights: .*missing.h5 does not exist"):
        metrics.find_inception_weights(str(tmp_path / "missing.h5"))


def test_inception_features_resize_any_size_to_pool_features():
    extractor = metrics.InceptionFeatures(None)  # random weights: no download in tests
    images = random_images(3)
    features = extractor(images).numpy()
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    np.testing.assert_allclose(extractor(images[:1]).numpy(), features[:1], rtol=1e-4, atol=1e-5)
