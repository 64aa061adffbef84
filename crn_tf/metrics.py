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

FID (`frechet_distance`) and KID (`kernel_inception_distance`) compare the *distributions* of
synthesized and reference images through Inception pool features (2048-d). Two networks:

- `StandardInception`: the TF Inception graph of 2015-12-05 (`classify_image_graph_def.pb`, from
  `inception-2015-12-05.tgz`) that the original FID code (TTUR, Heusel et al. 2017) loads, fed at
  'ExpandDims:0' with RGB 0..255 of any size (the graph resizes to 299x299 itself) and read at
  'pool_3:0'. pytorch-fid's weights are a port of this graph, so with it the figures follow the
  literature's protocol (same images, size and count given). The loader is tested on a small
  stand-in graph with the same tensor names, not on the real file (not downloadable here).
- `InceptionFeatures`: Keras' InceptionV3 (other weights, other resizing): NOT comparable to the
  FID numbers in papers; compare it only between runs of this code, on the same split, size and
  number of images.

Nothing here downloads; both need their files on disk. FID is biased upward for few images; KID
(unbiased polynomial-kernel MMD^2, Binkowski et al. 2018) is not.

Segmentation scores (`confusion_matrix`, `segmentation_scores`): mean IoU, per-class IoU and pixel
accuracy of a segmenter's prediction against the ground-truth layout, void pixels excluded.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
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
OTHER_NETWORK_NOTE = (
    "FID/KID from a feature network other than the standard FID Inception graph: not comparable to papers; "
    "compare only runs with the same network, split, size and image count"
)
# The original FID code's network (TTUR fid.py; pytorch-fid ports its weights).
FID_GRAPH_FILENAME = "classify_image_graph_def.pb"
FID_GRAPH_ARCHIVE = "inception-2015-12-05.tgz"
FID_GRAPH_INPUT = "ExpandDims:0"
FID_GRAPH_OUTPUT = "pool_3:0"
STANDARD_FID_NOTE = (
    "FID/KID from the TF Inception graph of 2015-12-05 (pool_3, 2048-d; the images go in at 'ExpandDims:0' and the "
    "graph resizes them to 299x299), the network of the original FID code and of pytorch-fid's weights: comparable "
    "to papers if the file is that release (compare its sha256) and the images, their size and count match"
)
KID_SUBSETS = 100  # clean-fid / torch-fidelity defaults
KID_SUBSET_SIZE = 1000


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

    `comparable` is False: other weights and resizing than the network papers use.

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
        self.name = "keras_inception_v3"
        self.comparable = False
        self.description = f"Keras InceptionV3 ({weights or 'random weights'}): {FID_NOTE}"

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


# ---- the standard FID network -----------------------------------------------------------------


def _read_graph_bytes(path: str) -> bytes:
    """The GraphDef bytes of `path`: a .pb, or the release archive (inception-2015-12-05.tgz) holding one."""
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"--fid_inception_graph: {path} does not exist; expected {FID_GRAPH_FILENAME} or {FID_GRAPH_ARCHIVE}"
        )
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    if path.endswith((".tgz", ".tar.gz", ".tar")):
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                member = next((m for m in archive.getmembers() if m.name.endswith(FID_GRAPH_FILENAME)), None)
                if member is None:
                    raise ValueError(f"--fid_inception_graph: {path} holds no {FID_GRAPH_FILENAME}")
                return archive.extractfile(member).read()
        except tarfile.TarError as e:
            raise ValueError(f"--fid_inception_graph: {path} is not a readable tar archive ({e})") from e
    if path.endswith(".pth") or data[:2] == b"PK":
        raise ValueError(
            f"--fid_inception_graph: {path} looks like PyTorch weights (pytorch-fid's pt_inception-2015-12-05-*.pth). "
            "crn_tf cannot read them without PyTorch; pass the TF graph they were converted from, "
            f"{FID_GRAPH_FILENAME} (in {FID_GRAPH_ARCHIVE}), which is the same network"
        )
    return data


def _subgraph(graph_def, output: str):
    """The nodes `output` depends on (data and control inputs), in their original order."""
    by_name = {node.name: node for node in graph_def.node}
    keep, todo = set(), [output]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(i.lstrip("^").split(":")[0] for i in by_name[name].input)
    result = tf.compat.v1.GraphDef()
    result.versions.CopyFrom(graph_def.versions)
    result.library.CopyFrom(graph_def.library)
    result.node.extend(node for node in graph_def.node if node.name in keep)
    return result


class StandardInception:
    """The original FID network: the TF Inception graph of 2015-12-05 -> pool_3 features [N, 2048].

    Feeds RGB [N, H, W, 3] in [0, 255] (float, any size) at 'ExpandDims:0', as TTUR's fid.py does;
    the graph itself resizes to 299x299 (ResizeBilinear) and scales to [-1, 1]. The JPEG decoder in
    front of 'ExpandDims' is cut off and replaced by a float input with a free batch dimension, so
    batches of any size go through (TTUR patches the static shapes for the same reason).

    Args:
        path: `classify_image_graph_def.pb`, or `inception-2015-12-05.tgz` containing it.

    Attributes:
        sha256: of the GraphDef bytes, so a report says exactly which file was used.
        comparable: True: this is the network papers use (if the file is the real release).
    """

    def __init__(self, path: str):
        data = _read_graph_bytes(path)
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError and others
            raise ValueError(f"--fid_inception_graph: {path} is not a TF GraphDef ({e})") from e
        names = {node.name for node in graph_def.node}
        for tensor in (FID_GRAPH_INPUT, FID_GRAPH_OUTPUT):
            if tensor.split(":")[0] not in names:
                raise ValueError(
                    f"--fid_inception_graph: {path} has no tensor {tensor!r}; expected the 2015-12-05 Inception graph "
                    f"({FID_GRAPH_FILENAME}) with input {FID_GRAPH_INPUT!r} and output {FID_GRAPH_OUTPUT!r}"
                )
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.name = "tf_inception_2015_12_05"
        self.comparable = True
        self.description = f"{STANDARD_FID_NOTE}. File: {path} (sha256 {self.sha256})"
        # Replace the input node by a float placeholder of any batch size, then keep only what
        # pool_3 needs: the JPEG decoder (and its fixed batch of 1) goes away.
        input_node = FID_GRAPH_INPUT.split(":")[0]
        for node in graph_def.node:
            if node.name == input_node:
                node.Clear()
                node.name, node.op = input_node, "Placeholder"
                node.attr["dtype"].type = tf.float32.as_datatype_enum
                node.attr["shape"].shape.CopyFrom(tf.TensorShape([None, None, None, 3]).as_proto())
        graph_def = _subgraph(graph_def, FID_GRAPH_OUTPUT.split(":")[0])
        for node in graph_def.node:
            node.attr.pop("_output_shapes", None)  # recorded for batch 1; shapes are inferred again

        def import_graph():
            tf.compat.v1.import_graph_def(graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(import_graph, [])
        self._fn = wrapped.prune(
            wrapped.graph.get_tensor_by_name(FID_GRAPH_INPUT), wrapped.graph.get_tensor_by_name(FID_GRAPH_OUTPUT)
        )

    def __call__(self, images) -> tf.Tensor:
        """RGB [N, H, W, 3] in [0, 255] -> float32 [N, D] pool_3 features."""
        features = self._fn(_as_float(images))
        return tf.reshape(tf.cast(features, tf.float32), [tf.shape(features)[0], -1])


def load_fid_network(
    graph_path: str | None = None, keras_weights: str | None = None, cache_dirs: Sequence[str] | None = None
):
    """The FID/KID feature network and a line saying which, without downloading anything.

    Args:
        graph_path: the standard graph (`--fid_inception_graph`): preferred, comparable with papers.
        keras_weights: Keras InceptionV3 weights (`--inception_weights`); None looks in Keras' cache.
        cache_dirs: where Keras' cache is looked for (default `keras_cache_dirs()`).

    Returns:
        (network, note): network None (FID/KID skipped) with a note saying why and what to pass.
    """
    if graph_path:
        network = StandardInception(graph_path)
        return network, network.description
    path, note = find_inception_weights(keras_weights, cache_dirs)
    if path is None:
        return None, (
            f"{note} For figures comparable with papers pass --fid_inception_graph=PATH to {FID_GRAPH_FILENAME} "
            f"(from {FID_GRAPH_ARCHIVE})."
        )
    network = InceptionFeatures(path)
    return network, f"{note}. {network.description}"


# ---- KID ---------------------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3 between rows of x [M, D] and y [N, D] -> [M, N]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(
    features1, features2, num_subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.

    As in Binkowski et al. (ICLR 2018) and clean-fid / torch-fidelity: `num_subsets` times, draw m =
    min(subset_size, M1, M2) rows of each set without replacement and compute
    sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.

    Returns:
        (mean, standard deviation) over the subsets. Can be slightly negative (it is unbiased).
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs two feature sets [M, D] with the same D, got {x.shape} and {y.shape}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors in each set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        within = polynomial_kernel(xs, xs) + polynomial_kernel(ys, ys)
        cross = polynomial_kernel(xs, ys)
        values.append((within.sum() - np.trace(within)) / (m * (m - 1)) - 2.0 * cross.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


# ---- segmentation scores ----------------------------------------------------------------------


def confusion_matrix(label_ids, predicted_ids, num_classes: int) -> np.ndarray:
    """Pixel counts int64 [C, C + 1]: row = ground-truth class, column = predicted class.

    Ground-truth ids outside 0..C-1 (void) are left out. Predictions outside 0..C-1 (a segmenter
    class with no counterpart in the label space) go to the last column: they are wrong for the
    ground-truth class and count for no class.
    """
    truth = tf.reshape(tf.cast(label_ids, tf.int64), [-1])
    predicted = tf.reshape(tf.cast(predicted_ids, tf.int64), [-1])
    if truth.shape != predicted.shape:
        raise ValueError(f"confusion_matrix: {tf.shape(label_ids)} labels vs {tf.shape(predicted_ids)} predictions")
    valid = (truth >= 0) & (truth < num_classes)
    predicted = tf.where((predicted >= 0) & (predicted < num_classes), predicted, num_classes)
    index = tf.boolean_mask(truth * (num_classes + 1) + predicted, valid)
    counts = tf.math.bincount(index, minlength=num_classes * (num_classes + 1), dtype=tf.int64)
    return counts.numpy().reshape(num_classes, num_classes + 1)


def segmentation_scores(confusion: np.ndarray) -> dict:
    """Mean IoU, per-class IoU and pixel accuracy from a `confusion_matrix` [C, C + 1].

    IoU_c = TP / (TP + FP + FN). A class that is neither in the ground truth nor predicted has no
    IoU (None) and is left out of the mean, as in the Cityscapes and DeepLab evaluations.
    Pixel accuracy = correct / all non-void pixels.
    """
    confusion = np.asarray(confusion, np.int64)
    c = confusion.shape[0]
    true_positive = np.diag(confusion[:, :c]).astype(np.float64)
    truth = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion[:, :c].sum(axis=0).astype(np.float64)
    union = truth + predicted - true_positive
    iou = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union)]
    defined = [v for v in iou if v is not None]
    total = float(confusion.sum())
    return {
        "miou": float(np.mean(defined)) if defined else None,
        "pixel_accuracy": float(true_positive.sum() / total) if total else None,
        "per_class_iou": iou,
        "classes_scored": len(defined),
        "pixels": int(total),
        "pixels_predicted_outside_label_space": int(confusion[:, c].sum()),
    }
