"""The CRN losses: perceptual (eq. 1), image-space (eq. 4) and the diversity losses (eq. 2, eq. 3).

Every term is a *mean* absolute difference (as the original code computes it), so the paper's
automatic initialisation lambda_l = 1 / number-of-elements of the L1 *sum* is weight 1 here, and
`rebalance()` rescales each weight to 1 / (that term's running mean), so each term contributes about
1 ("rescaled to normalize the expected contribution of each term", Sec. 3.3). The released models
used fixed weights instead (config.LAYER_WEIGHTS_*), which presets carry.

A loss call returns a dict of per-example tensors [N]: `total` (weighted, what is minimised) and
each unweighted term by layer name, for logging and rebalancing.

Backend-agnostic (`keras.ops`, no TensorFlow import); the balancing state is four Keras variables,
which a TensorFlow trainer checkpoints by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from crn_tf.config import DIVERSITY_MEAN_WEIGHT, DIVERSITY_MIN_WEIGHT, LOSS_LAYERS, CRNConfig
from crn_tf.model import split_outputs
from crn_tf.ops import area_downsample
from crn_tf.vgg import POOLS_BEFORE, VGGFeatures

LOSS_KINDS = ("perceptual", "image")


class CRNLoss:
    """Perceptual or image-space loss of a CRN, with the diversity loss for k > 1 outputs.

    Args:
        kind: `perceptual` (eq. 1: the image and VGG-19 conv1_2..conv5_2) or `image` (eq. 4).
        num_outputs: k. For k > 1 the loss is over the collection: `diversity='class'` is eq. 3
            (per semantic class, the best of the k images), `'image'` is eq. 2 (the best image);
            both mixed as the original: 0.999 * (sum of minima) + 0.001 * (sum of means over u).
        layer_weights: one weight per layer of this kind, or None for the paper's automatic weights.
        feature_extractor: a VGGFeatures (required for `perceptual`).
    """

    def __init__(
        self,
        kind: str = "perceptual",
        num_outputs: int = 1,
        layer_weights: Sequence[float] | None = None,
        feature_extractor: VGGFeatures | None = None,
        diversity: str = "class",
        name: str = "crn_loss",
    ):
        self.name = name
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
        if kind == "perceptual" and feature_extractor is None:
            raise ValueError("the perceptual loss needs a feature_extractor (crn_tf.vgg.VGGFeatures)")
        if diversity not in ("class", "image"):
            raise ValueError(f"diversity must be 'class' (eq. 3) or 'image' (eq. 2), got {diversity!r}")
        self.kind = kind
        self.layer_names = LOSS_LAYERS if kind == "perceptual" else LOSS_LAYERS[:1]
        if layer_weights is None:
            layer_weights = [1.0] * len(self.layer_names)
        elif kind == "image" and len(layer_weights) == len(LOSS_LAYERS):
            layer_weights = layer_weights[:1]  # a preset's weights: keep the image term's
        if len(layer_weights) != len(self.layer_names):
            raise ValueError(
                f"{kind} loss needs {len(self.layer_names)} layer weights ({', '.join(self.layer_names)}), "
                f"got {len(layer_weights)}"
            )
        self.num_outputs = int(num_outputs)
        self.diversity = diversity
        self.feature_extractor = feature_extractor
        n = len(self.layer_names)
        # Balancing state: checkpointed with the trainer, so a resumed run keeps its weights.
        # autocast=False: read in float32 even inside a mixed-precision layer call.
        state = dict(trainable=False, autocast=False)
        self.layer_weights = keras.Variable(np.array(layer_weights, np.float32), name="layer_weights", **state)
        self.term_sums = keras.Variable(np.zeros([n], np.float32), name="term_sums", **state)
        self.term_count = keras.Variable(np.float32(0.0), name="term_count", **state)
        self.rebalanced = keras.Variable(False, dtype="bool", name="rebalanced", **state)

    def _weights(self) -> list:
        """The layer weights as a list of scalar tensors (the variables' current values)."""
        weights = ops.convert_to_tensor(self.layer_weights)
        return [weights[i] for i in range(len(self.layer_names))]

    def features(self, images) -> list:
        """[M, H, W, 3] -> one tensor per loss layer (the image itself first)."""
        if self.kind == "image":
            return [images]
        # Under a mixed-precision policy VGG computes in float16/bfloat16; the loss sums in float32.
        return [ops.cast(f, "float32") for f in self.feature_extractor(images)]

    def __call__(self, real, fake, layout=None, real_features=None) -> dict:
        """real: RGB [N, H, W, 3]; fake: [N, H, W, 3k]; layout: one-hot [N, H, W, C] (needed for
        eq. 3); real_features: `features(real)` if the caller computed them already (the trainer
        does, outside its gradient tape). Returns per-example [N] tensors: `total` and each
        unweighted term."""
        fake = ops.cast(fake, "float32")
        k = self.num_outputs
        real_feats = self.features(ops.cast(real, "float32")) if real_features is None else list(real_features)
        weights = self._weights()
        if k == 1:
            fake_feats = self.features(fake)
            terms = [ops.mean(ops.abs(r - f), axis=(1, 2, 3)) for r, f in zip(real_feats, fake_feats)]
            return self._named(_weighted_sum(weights, terms), terms)

        n = ops.shape(fake)[0]
        collection = split_outputs(fake, k)  # [N, k, H, W, 3]
        fake_feats = self.features(ops.reshape(collection, (n * k, *ops.shape(collection)[2:])))
        # Per layer: channel-mean absolute difference of each of the k images, [N, k, h, w].
        diffs = []
        for r, f in zip(real_feats, fake_feats):
            f = ops.reshape(f, (n, k, *ops.shape(f)[1:]))
            diffs.append(ops.mean(ops.abs(ops.expand_dims(r, 1) - f), axis=-1))

        if self.diversity == "image":  # eq. 2: per image u, the whole-image loss
            terms = [ops.mean(d, axis=(2, 3)) for d in diffs]  # [N, k] each
            content = _weighted_sum(weights, terms)  # [N, k]
            best = ops.expand_dims(ops.argmin(content, axis=1), 1)  # [N, 1]
            total = DIVERSITY_MIN_WEIGHT * ops.min(content, axis=1) + DIVERSITY_MEAN_WEIGHT * ops.mean(content, axis=1)
            return self._named(total, [ops.take_along_axis(t, best, axis=1)[:, 0] for t in terms])

        if layout is None:
            raise ValueError("the class diversity loss (eq. 3) needs the layout")
        # eq. 3: per class p, the mean over pixels of mask_p (area-downsampled to the layer's size)
        # times the channel-mean difference; then per class the best of the k images.
        terms = []  # [N, k, P] each
        mask = ops.cast(layout, "float32")
        pools_done = 0
        for name, d in zip(self.layer_names, diffs):
            for _ in range(POOLS_BEFORE[name] - pools_done):
                mask = area_downsample(mask)
            pools_done = POOLS_BEFORE[name]
            pixels = ops.cast(ops.shape(d)[2] * ops.shape(d)[3], "float32")
            terms.append(ops.einsum("nkhw,nhwp->nkp", d, mask) / pixels)
        content = _weighted_sum(weights, terms)  # [N, k, P]
        total = DIVERSITY_MIN_WEIGHT * ops.sum(ops.min(content, axis=1), axis=1) + DIVERSITY_MEAN_WEIGHT * (
            ops.sum(ops.mean(content, axis=1), axis=1)
        )
        # Log each term of the virtual image assembled from the best output per class.
        best = ops.expand_dims(ops.argmin(content, axis=1), 1)  # [N, 1, P]
        chosen = [ops.sum(ops.take_along_axis(t, best, axis=1)[:, 0], axis=1) for t in terms]
        return self._named(total, chosen)

    def _named(self, total, terms) -> dict:
        out = {"total": total}
        out.update(zip(self.layer_names, terms))
        return out

    # ---- automatic layer weights (paper Sec. 3.3) ----
    def accumulate(self, terms: dict) -> None:
        """Adds the batch means of the unweighted terms to the running statistics."""
        means = ops.stack([ops.mean(ops.cast(terms[name], "float32")) for name in self.layer_names])
        self.term_sums.assign(self.term_sums + means)
        self.term_count.assign(self.term_count + 1.0)

    def rebalance(self) -> None:
        """Sets each weight to 1 / (running mean of its term), so each term contributes about 1."""
        means = ops.convert_to_tensor(self.term_sums) / ops.maximum(ops.convert_to_tensor(self.term_count), 1.0)
        self.layer_weights.assign(ops.where(means > 0, 1.0 / ops.maximum(means, 1e-12), self.layer_weights))
        self.term_sums.assign(ops.zeros_like(self.term_sums))
        self.term_count.assign(0.0)
        self.rebalanced.assign(True)


def _weighted_sum(weights: list, terms: list):
    """sum_l weights[l] * terms[l]."""
    total = weights[0] * terms[0]
    for w, t in zip(weights[1:], terms[1:]):
        total = total + w * t
    return total


def build_loss(
    config: CRNConfig,
    kind: str = "perceptual",
    vgg_weights: str | None = "imagenet",
    vgg_pooling: str = "avg",
    automatic_weights: bool = False,
) -> CRNLoss:
    """The loss for `config`: its preset's fixed layer weights unless `automatic_weights` or the
    config has none."""
    weights = None if automatic_weights else config.layer_weights
    vgg = VGGFeatures(weights=vgg_weights, pooling=vgg_pooling) if kind == "perceptual" else None
    return CRNLoss(
        kind=kind,
        num_outputs=config.num_outputs,
        layer_weights=weights,
        feature_extractor=vgg,
        diversity=config.diversity,
    )
