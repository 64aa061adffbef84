"""Image-synthesis metrics that need no download: L1, PSNR, SSIM, the VGG perceptual distance, and FID.

Every per-image metric takes two float RGB batches in [0, 255], [N, H, W, 3], and returns one value
per image, [N]:

- `l1`: mean absolute difference over pixels and channels, in 0..255 units (lower is better).
- `psnr`: peak signal-to-noise ratio in dB with data range 255 (higher is better; +inf for
  identical images).
- `ssim`: structural similarity (`tf.image.ssim`, max_val 255, Gaussian window 11 / sigma 1.5;
  a smaller window on images smaller than 11 pixels, see `ssim_window`) (higher is better, <= 1).
- `perceptual_distance`: the paper's eq. 1 between a synthesized image and its reference,
  sum_l lambda_l * mean |Phi_l(reference) - Phi_l(synthesized)| over the image and VGG-19
  conv1_2..conv5_2 (lower is better). Its value depends on the VGG weights (ImageNet, a file, or
  seeded random `none`) and on the layer weights, so reports carry both.

FID (`frechet_distance` on `InceptionFeatures`) compares the *distributions* of synthesized and
reference images through Keras' InceptionV3 pool features (2048-d, inputs resized to 299x299).
It runs only with ImageNet weights already on disk (`find_inception_weights`); nothing here
downloads. It is NOT comparable to the FID numbers in papers, which use pytorch-fid's
TF1-derived Inception graph and its resizing: compare it only between runs of this code, on the
same split, size and number of images (FID is biased upward for few images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from crn_tf.config import LOSS_LAYERS

DATA_RANGE = 255.0
SSIM_FILTER_SIZE = 11  # tf.image.ssim's defaults (Wang et al. 2004)
SSIM_FILTER_SIGMA = 1.5
INCEPTION_SIZE = 299
INCEPTION_NOTOP_FILENAME = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
FID_NOTE = (
    "FID from Keras InceptionV3 pool features (2048-d, bilinear resize to 299x299): not comparable to "
    "pytorch-fid numbers in papers; compare only runs of crn_tf on the same split, size and image count."
)


def _as_float(images):
    return tf.cast(tf.convert_to_tensor(images), tf.float32)


def l1(synthesized, reference):
    """Mean absolute difference per image, in 0..255 units: [N, H, W, 3] x2 -> [N]."""
    return tf.reduce_mean(tf.abs(_as_float(synthesized) - _as_float(reference)), axis=[1, 2, 3])


def psnr(synthesized, reference):
    """PSNR in dB with data range 255, per image: [N, H, W, 3] x2 -> [N] (+inf where identical)."""
    mse = tf.reduce_mean(tf.square(_as_float(synthesized) - _as_float(reference)), axis=[1, 2, 3])
    return 10.0 * tf.math.log(DATA_RANGE**2 / mse) / tf.math.log(10.0)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """The SSIM Gaussian window (size, sigma) for images of this size.

    The standard 11x11 window with sigma 1.5, unless the image is smaller: then the largest odd
    size that fits, with sigma scaled in proportion (size / 11 * 1.5). SSIM with a smaller window
    is not the standard SSIM; reports say which window was used.
    """
    size = min(SSIM_FILTER_SIZE, int(height), int(width))
    if size < 1:
        raise ValueError(f"SSIM needs images of at least 1x1 pixels, got {height}x{width}")
    if size % 2 == 0:
        size -= 1
    return size, SSIM_FILTER_SIGMA * size / SSIM_FILTER_SIZE


def ssim(synthesized, reference, filter_size: int | None = None, filter_sigma: float | None = None):
    """SSIM per image (tf.image.ssim, max_val 255): [N, H, W, 3] x2 -> [N].

    Args:
        synthesized, reference: float RGB [N, H, W, 3] in [0, 255].
        filter_size, filter_sigma: the Gaussian window; default `ssim_window(H, W)` (11 / 1.5 unless
            the images are smaller than 11 pixels).
    """
    synthesized, reference = _as_float(synthesized), _as_float(reference)
    if filter_size is None:
        height, width = synthesized.shape[1], synthesized.shape[2]
        if height is None or width is None:
            raise ValueError("ssim needs static image sizes to choose its window; pass filter_size")
        filter_size, default_sigma = ssim_window(height, width)
        filter_sigma = default_sigma if filter_sigma is None else filter_sigma
    elif filter_sigma is None:
        filter_sigma = SSIM_FILTER_SIGMA
    return tf.image.ssim(synthesized, reference, max_val=DATA_RANGE, filter_size=filter_size, filter_sigma=filter_sigma)


def perceptual_distance(synthesized, reference, vgg, layer_weights: Sequence[float] | None = None):
    """The paper's eq. 1 distance per image: sum_l w_l * mean |Phi_l(reference) - Phi_l(synthesized)|.

    Args:
        synthesized, reference: float RGB [N, H, W, 3] in [0, 255].
        vgg: a `crn_tf.vgg.VGGFeatures` (its weights decide what the number means).
        layer_weights: one weight per layer of `config.LOSS_LAYERS` (the image, then VGG-19
            conv1_2..conv5_2); default all 1.

    Returns:
        [N] float32: the same value as `CRNLoss(kind="perceptual", num_outputs=1)`'s `total`.
    """
    if layer_weights is None:
        layer_weights = [1.0] * len(LOSS_LAYERS)
    if len(layer_weights) != len(LOSS_LAYERS):
        raise ValueError(
            f"perceptual distance needs {len(LOSS_LAYERS)} layer weights ({', '.join(LOSS_LAYERS)}), "
            f"got {len(layer_weights)}"
        )
    synthesized, reference = _as_float(synthesized), _as_float(reference)
    n = tf.shape(synthesized)[0]
    # One VGG pass over both batches: [2N, H, W, 3].
    features = vgg(tf.concat([synthesized, reference], axis=0))
    terms = []
    for f in features:
        f = tf.cast(f, tf.float32)
        terms.append(tf.reduce_mean(tf.abs(f[:n] - f[n:]), axis=[1, 2, 3]))
    return tf.add_n([float(w) * t for w, t in zip(layer_weights, terms)])


# ---- FID -----------------------------------------------------------------------------------------


def keras_cache_dirs() -> list[str]:
    """Where Keras caches downloaded weights: $KERAS_HOME (or ~/.keras), and /tmp/.keras (its fallback
    when the home directory is not writable)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return [os.path.join(home, "models"), os.path.join("/tmp", ".keras", "models")]


def find_inception_weights(path: str | None = None, cache_dirs: Sequence[str] | None = None) -> tuple[str | None, str]:
    """Locates InceptionV3 ImageNet (no-top) weights on disk, without downloading.

    Args:
        path: a weights file given by the user (`--inception_weights`); if None, Keras' cache is
            looked at.
        cache_dirs: the cache directories to look in (default `keras_cache_dirs()`).

    Returns:
        (path, note): the file to load, or None with a note saying why FID is skipped.

    Raises:
        ValueError: if `path` is given and does not exist.
    """
    if path:
        if not tf.io.gfile.exists(path):
            raise ValueError(f"--inception_weights: {path} does not exist; expected a Keras InceptionV3 weights file")
        return path, f"InceptionV3 weights: {path}"
    dirs = keras_cache_dirs() if cache_dirs is None else cache_dirs
    candidates = [os.path.join(d, INCEPTION_NOTOP_FILENAME) for d in dirs]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate, f"InceptionV3 weights: Keras cache {candidate}"
    return None, (
        f"FID skipped: no InceptionV3 ImageNet weights on disk ({' or '.join(candidates)}); nothing is "
        "downloaded at evaluation time. Pass --inception_weights=PATH, or cache them once with "
        '`python -c "import keras; keras.applications.InceptionV3(include_top=False)"`.'
    )


class InceptionFeatures:
    """Keras InceptionV3 pool features for FID: RGB [N, H, W, 3] in [0, 255] -> float32 [N, 2048].

    Images are resized (bilinear) to 299x299 and scaled with
    `keras.applications.inception_v3.preprocess_input` (to [-1, 1]).

    Args:
        weights: a Keras InceptionV3 weights file (from `find_inception_weights`), or None for
            seeded random weights (tests only: the distances then mean nothing).
    """

    def __init__(self, weights: str | None):
        import keras

        self.weights = weights
        self.model = keras.applications.InceptionV3(
            include_top=False, weights=weights, pooling="avg", input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3)
        )
        self._preprocess = keras.applications.inception_v3.preprocess_input
        self._call = tf.function(self._features, reduce_retracing=True)

    def _features(self, images):
        images = tf.image.resize(_as_float(images), [INCEPTION_SIZE, INCEPTION_SIZE], method="bilinear")
        return tf.cast(self.model(self._preprocess(images), training=False), tf.float32)

    def __call__(self, images):
        return self._call(images)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as np.cov) of features [M, D], in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors [M, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Returns (sqrt(matrix), its eigenvalues clipped at 0)."""
    matrix = (matrix + matrix.T) / 2  # exact symmetry, or eigh's rounding leaks into the result
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, 0.0, None)  # rounding makes tiny negative eigenvalues of singular matrices
    return (vectors * np.sqrt(values)) @ vectors.T, values


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)). tr(sqrt(S1 S2)) is computed as
    tr(sqrt(sqrt(S1) S2 sqrt(S1))): that product is symmetric PSD, so its eigenvalues are real and
    non-negative, which avoids the complex parts and blow-ups of a general sqrtm on singular
    (fewer images than dimensions) covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"FID statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    root1, _ = _sqrt_psd(sigma1)
    _, product_values = _sqrt_psd(root1 @ sigma2 @ root1)
    trace_sqrt = np.sum(np.sqrt(product_values))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def fid(features1, features2) -> float:
    """FID between two sets of features [M1, D] and [M2, D]."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))
