"""The graph functions behind the serving signatures, shared by the Keras path (crn-synthesize), the exported
signatures (export/signatures.py) and crn-studio's view of what the model saw: label ids -> images, and a layout
PNG -> label ids in-graph. The names and rules they follow are crn_tf/serving_contract.py's.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from crn_tf import labels, serving_contract
from crn_tf.config import CRNConfig

# The IHDR chunk is first in every PNG: signature (8), length (4), "IHDR" (4), width (4), height (4),
# then the bit depth (1 byte, offset 24).
_IHDR_BIT_DEPTH_OFFSET = 24


def to_uint8(images):
    """Float images in about [0, 255] -> uint8: clipped to [0, 255] and rounded (any shape)."""
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)


def synthesize_ids(model, label_ids):
    """Label ids uint8/int [N, H, W] -> images uint8 [N, k, H, W, 3] through a CRN Keras model.

    Ids outside 0..num_classes-1 are void. Works eagerly and inside tf.function (the exported
    `serving_default` signature is this function).
    """
    from crn_tf.model import split_outputs  # deferred: importing this module needs no Keras

    config: CRNConfig = model.crn_config
    layout = labels.one_hot(label_ids, config.num_classes)  # [N, H, W, C + 1]
    images = model(layout)  # [N, H, W, 3k] float
    return split_outputs(to_uint8(images), config.num_outputs)  # [N, k, H, W, 3]


def _pack_rgb(rgb):
    """uint8/int [..., 3] -> int32 [...] = r << 16 | g << 8 | b."""
    rgb = tf.cast(rgb, tf.int32)
    return rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]


def colors_to_ids_graph(rgb, space: labels.LabelSpace):
    """Colour layout uint8 [H, W, 3] -> train ids uint8 [H, W] in-graph; unknown colours -> void.

    A comparison against the (small) palette rather than a hash table: no table resource to
    initialise, so the TF1 loader and TF Serving need nothing beyond the graph.
    """
    palette = np.array(space.palette, np.int32)  # [P, 3]
    keys = tf.constant(palette[:, 0] * 65536 + palette[:, 1] * 256 + palette[:, 2], tf.int32)  # [P]
    match = tf.equal(_pack_rgb(rgb)[..., None], keys)  # [H, W, P]
    ids = tf.argmax(tf.cast(match, tf.int32), axis=-1, output_type=tf.int32)  # [H, W]
    return tf.cast(tf.where(tf.reduce_any(match, axis=-1), ids, labels.VOID_ID), tf.uint8)


def decode_label_png_graph(png, space: labels.LabelSpace):
    """One layout PNG (string scalar) -> train ids uint8 [H, W], in-graph.

    The channel count decides the meaning: 1-2 channels are ids, 3-4 are palette colours.
    """
    # substr clamps the length; the zero padding makes a string shorter than the header read as bit depth 0
    # (decode_png then says what is wrong with it) instead of an out-of-range substr.
    header = tf.strings.join([tf.strings.substr(png, 0, _IHDR_BIT_DEPTH_OFFSET + 1), b"\0" * 32])
    is_png = tf.equal(tf.strings.substr(header, 0, 8), serving_contract.PNG_MAGIC)
    check = tf.debugging.Assert(is_png, ["label_png_bytes: an element is not a PNG (no PNG signature)"])
    sixteen_bit = tf.equal(tf.strings.substr(header, _IHDR_BIT_DEPTH_OFFSET, 1), b"\x10")
    check_depth = tf.debugging.Assert(tf.logical_not(is_png & sixteen_bit), [serving_contract.SIXTEEN_BIT_PNG_MESSAGE])
    with tf.control_dependencies([check, check_depth]):
        decoded = tf.io.decode_png(png, channels=0, dtype=tf.uint8)  # [H, W, c], c in 1..4
    channels = tf.shape(decoded)[-1]
    return tf.cond(
        channels >= 3,
        lambda: colors_to_ids_graph(decoded[..., :3], space),
        lambda: decoded[..., 0],
    )
