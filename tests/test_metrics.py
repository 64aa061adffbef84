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


def test_frechet_distance_matches_scipy_sqrtm():
    """Against the original FID code's formula (TTUR fid.py): scipy.linalg.sqrtm of sigma1 @ sigma2."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    features1 = rng.normal(size=[300, 12]) @ rng.normal(size=[12, 12]) + rng.normal(size=12)
    features2 = rng.normal(size=[250, 12]) @ rng.normal(size=[12, 12]) * 0.7 + rng.normal(size=12)
    mu1, sigma1 = features1.mean(0), np.cov(features1, rowvar=False)
    mu2, sigma2 = features2.mean(0), np.cov(features2, rowvar=False)
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    # rel 1e-8: both are float64; sqrtm (Schur) and our eigendecomposition differ only by rounding.
    assert metrics.fid(features1, features2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=[8, 5]), rng.normal(0.5, 1.2, size=[8, 5])

    def k(a, b):
        return (np.dot(a, b) / 5 + 1) ** 3

    m = 8
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    expected = within - 2 * cross
    # Subsets of all 8 rows are permutations: every subset gives the same (order-free) value.
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=5)
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    # Smaller subsets: the mean of per-subset values, each of the same unbiased form.
    small, small_std = metrics.kernel_inception_distance(x, y, num_subsets=50, subset_size=4)
    assert small_std > 0 and abs(small - expected) < 3 * small_std
    with pytest.raises(ValueError, match="same D"):
        metrics.kernel_inception_distance(x, y[:, :3])


def write_stand_in_inception(path, dim=2048):
    """A small graph with the tensor names of the 2015-12-05 Inception graph (the real file is not
    downloadable here): DecodeJpeg/contents -> DecodeJpeg -> Cast -> ExpandDims -> ResizeBilinear
    299x299 -> Sub 128 -> Mul 1/128 -> (8x8 average, 1x1 conv to dim, ReLU) -> pool_3 [1, 1, 1, dim]
    -> pool_3/_reshape [1, dim] (batch 1 fixed, as in the real graph). Returns the conv weights."""
    import tensorflow as tf

    weights = np.random.default_rng(4).normal(size=[1, 1, 3, dim]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        contents = tf.compat.v1.placeholder(tf.string, [], name="DecodeJpeg/contents")
        decoded = tf.raw_ops.DecodeJpeg(contents=contents, channels=3, name="DecodeJpeg")
        expanded = tf.expand_dims(tf.cast(decoded, tf.float32, name="Cast"), 0, name="ExpandDims")
        resized = tf.raw_ops.ResizeBilinear(images=expanded, size=[299, 299], name="ResizeBilinear")
        x = tf.multiply(tf.subtract(resized, 128.0, name="Sub"), 1 / 128, name="Mul")
        x = tf.nn.relu(tf.nn.conv2d(tf.nn.avg_pool2d(x, 8, 8, "VALID"), weights, 1, "VALID"))
        pool = tf.nn.avg_pool2d(x, 37, 37, "VALID", name="pool_3")
        tf.nn.softmax(tf.reshape(pool, [1, dim], name="pool_3/_reshape"), name="softmax")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return weights


def test_standard_inception_graph_loader_on_a_stand_in(tmp_path):
    import tarfile

    import tensorflow as tf

    graph = tmp_path / metrics.FID_GRAPH_FILENAME
    weights = write_stand_in_inception(graph)
    network, note = metrics.load_fid_network(str(graph))
    assert network.comparable and network.name == "tf_inception_2015_12_05"
    assert "2015-12-05" in note and network.sha256 in note and str(graph) in note
    images = random_images(3)  # 16x32: any size goes in, the graph resizes
    features = network(images).numpy()
    # The same computation written directly: the graph's bilinear resize (no half-pixel centres).
    x = (tf.raw_ops.ResizeBilinear(images=images, size=[299, 299]) - 128.0) / 128.0
    x = tf.nn.relu(tf.nn.conv2d(tf.nn.avg_pool2d(x, 8, 8, "VALID"), weights, 1, "VALID"))
    expected = tf.reduce_mean(x, axis=[1, 2]).numpy()
    assert features.shape == (3, 2048)
    # atol: float32 sums of 37x37 values in a different order (graph AvgPool vs reduce_mean).
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(network(images[1:2]).numpy(), features[1:2], rtol=1e-4, atol=1e-5)

    archive = tmp_path / metrics.FID_GRAPH_ARCHIVE  # the release archive works as it is
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(graph, arcname=metrics.FID_GRAPH_FILENAME)
    assert metrics.StandardInception(str(archive)).sha256 == network.sha256

    broken = tmp_path / "other.pb"
    import tensorflow.compat.v1 as tf1

    other = tf.Graph()
    with other.as_default():
        tf1.placeholder(tf.float32, [None, 4], name="ExpandDims")
    broken.write_bytes(other.as_graph_def().SerializeToString())
    with pytest.raises(ValueError, match="other.pb has no tensor 'pool_3:0'"):
        metrics.StandardInception(str(broken))
    torch_file = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch_file.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="PyTorch weights .* cannot read them without PyTorch"):
        metrics.StandardInception(str(torch_file))
    with pytest.raises(ValueError, match="--fid_inception_graph: .*missing.pb does not exist"):
        metrics.StandardInception(str(tmp_path / "missing.pb"))
    # Without the graph and without Keras weights on disk: skipped, and the note names the flag.
    network, note = metrics.load_fid_network(None, None, cache_dirs=[str(tmp_path / "empty")])
    assert network is None and "FID skipped" in note and "--fid_inception_graph" in note


def test_confusion_matrix_and_scores_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 3]], np.uint8)[None]  # [1, 2, 4], one void pixel
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 7]], np.int32)[None]  # 7: not a class of the space
    confusion = metrics.confusion_matrix(truth, predicted, num_classes=4)
    assert confusion.shape == (4, 5) and confusion.sum() == 7  # void left out
    assert confusion[0].tolist() == [1, 1, 0, 0, 0] and confusion[3].tolist() == [0, 0, 0, 0, 1]
    scores = metrics.segmentation_scores(confusion)
    # IoU: class 0: TP 1, FN 1, FP 1 (a class-2 pixel) -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 1, FN 1 -> 1/2; class 3: TP 0, FN 1 -> 0.
    expected = [1 / 3, 2 / 3, 1 / 2, 0.0]
    assert scores["per_class_iou"] == pytest.approx(expected)
    assert scores["miou"] == pytest.approx(np.mean(expected)) and scores["pixel_accuracy"] == pytest.approx(4 / 7)
    assert scores["pixels_predicted_outside_label_space"] == 1
    # A class neither present nor predicted has no IoU and is left out of the mean.
    five = metrics.segmentation_scores(metrics.confusion_matrix(truth, predicted, num_classes=5))
    assert five["per_class_iou"][4] is None and five["miou"] == pytest.approx(np.mean(expected))
