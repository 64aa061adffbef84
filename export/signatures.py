"""The serving signatures of an exported CRN, built with `keras.export.ExportArchive`.

- `serving_default`: `label_ids` uint8 [N, H, W] -> `image` uint8 [N, H, W, 3]
  (+ `images` uint8 [N, k, H, W, 3] for diverse models, k > 1).
- `synthesize_png`: `label_png_bytes` string [N] -> `image_png_bytes` string [N] (the first image of
  the collection). Each PNG is decoded in-graph: 1 or 2 channels = train ids (grey + alpha: alpha
  ignored); 3 or 4 channels = colours of the label space's palette (palette-mode PNGs decode to RGB),
  unknown colours = void. PNGs in one request may have different sizes. 16-bit PNGs are refused
  (InvalidArgument): decoding them to uint8 would keep only the high byte of every id.

Ids >= num_classes are void. A size the model cannot take fails with InvalidArgument naming the
multiple it needs (the model's own assertion); nothing is resized.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from crn_tf import labels
from crn_tf.synthesize import synthesize_ids

SERVING_DEFAULT = "serving_default"
SYNTHESIZE_PNG = "synthesize_png"
# signature -> (input name, output names): the documented serving contract.
SIGNATURE_INPUTS = {SERVING_DEFAULT: "label_ids", SYNTHESIZE_PNG: "label_png_bytes"}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The IHDR chunk is first in every PNG: signature (8), length (4), "IHDR" (4), width (4), height (4),
# then the bit depth (1 byte, offset 24).
_IHDR_BIT_DEPTH_OFFSET = 24
# decode_png(dtype=uint8) keeps the high byte of 16-bit samples: ids 0..255 would all become 0.
SIXTEEN_BIT_PNG_MESSAGE = (
    "label_png_bytes: an element is a 16-bit PNG; layouts must be 8-bit PNGs "
    "(1-channel train ids 0..255, or label-space colours)"
)


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
    is_png = tf.equal(tf.strings.substr(header, 0, 8), _PNG_MAGIC)
    check = tf.debugging.Assert(is_png, ["label_png_bytes: an element is not a PNG (no PNG signature)"])
    sixteen_bit = tf.equal(tf.strings.substr(header, _IHDR_BIT_DEPTH_OFFSET, 1), b"\x10")
    check_depth = tf.debugging.Assert(tf.logical_not(is_png & sixteen_bit), [SIXTEEN_BIT_PNG_MESSAGE])
    with tf.control_dependencies([check, check_depth]):
        decoded = tf.io.decode_png(png, channels=0, dtype=tf.uint8)  # [H, W, c], c in 1..4
    channels = tf.shape(decoded)[-1]
    return tf.cond(
        channels >= 3,
        lambda: colors_to_ids_graph(decoded[..., :3], space),
        lambda: decoded[..., 0],
    )


def serving_default_fn(model):
    """`label_ids` uint8 [N, H, W] -> {'image': uint8 [N, H, W, 3], ('images': uint8 [N, k, H, W, 3])}."""
    k = model.crn_config.num_outputs

    def serving_default(label_ids):
        # The signature declares rank 3, but neither a signature wrapper's flat-call fallback nor a
        # Session::Run feed (TF Serving) enforces it: EnsureShape checks at run time.
        label_ids = tf.ensure_shape(label_ids, [None, None, None], name="label_ids")
        images = synthesize_ids(model, label_ids)  # [N, k, H, W, 3]
        outputs = {"image": images[:, 0]}
        if k > 1:
            outputs["images"] = images
        return outputs

    return serving_default


def synthesize_png_fn(model):
    """`label_png_bytes` string [N] -> {'image_png_bytes': string [N]}: PNG of the first image each."""
    space = model.crn_config.get_label_space()

    def synthesize_one(png):
        ids = decode_label_png_graph(png, space)  # [H, W]
        image = synthesize_ids(model, ids[None])[0, 0]  # [H, W, 3]
        return tf.io.encode_png(image)

    def synthesize_png(label_png_bytes):
        label_png_bytes = tf.ensure_shape(label_png_bytes, [None], name="label_png_bytes")  # see serving_default
        # One model call per PNG: a request may mix sizes, and no decoded batch needs stacking.
        pngs = tf.map_fn(synthesize_one, label_png_bytes, fn_output_signature=tf.TensorSpec([], tf.string))
        return {"image_png_bytes": pngs}

    return synthesize_png


def build_export_archive(model) -> keras.export.ExportArchive:
    """An ExportArchive holding `model` with the two serving signatures (write it with `write_out`)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default_fn(model),
        input_signature=[tf.TensorSpec([None, None, None], tf.uint8, name="label_ids")],
    )
    archive.add_endpoint(
        SYNTHESIZE_PNG,
        synthesize_png_fn(model),
        input_signature=[tf.TensorSpec([None], tf.string, name="label_png_bytes")],
    )
    return archive
