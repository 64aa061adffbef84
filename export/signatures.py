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
import tensorflow as tf

from crn_tf.serving_contract import (
    IMAGE,
    IMAGE_PNG_BYTES,
    IMAGES,
    LABEL_IDS,
    LABEL_PNG_BYTES,
    SERVING_DEFAULT,
    SIGNATURE_INPUTS,  # noqa: F401 - part of this module's API
    SYNTHESIZE_PNG,
)
from crn_tf.serving_graph import (  # noqa: F401 - colors_to_ids_graph: part of this module's API
    colors_to_ids_graph,
    decode_label_png_graph,
    synthesize_ids,
)


def serving_default_fn(model):
    """`label_ids` uint8 [N, H, W] -> {'image': uint8 [N, H, W, 3], ('images': uint8 [N, k, H, W, 3])}."""
    k = model.crn_config.num_outputs

    def serving_default(label_ids):
        # The signature declares rank 3, but neither a signature wrapper's flat-call fallback nor a
        # Session::Run feed (TF Serving) enforces it: EnsureShape checks at run time.
        label_ids = tf.ensure_shape(label_ids, [None, None, None], name=LABEL_IDS)
        images = synthesize_ids(model, label_ids)  # [N, k, H, W, 3]
        outputs = {IMAGE: images[:, 0]}
        if k > 1:
            outputs[IMAGES] = images
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
        label_png_bytes = tf.ensure_shape(label_png_bytes, [None], name=LABEL_PNG_BYTES)  # see serving_default
        # One model call per PNG: a request may mix sizes, and no decoded batch needs stacking.
        pngs = tf.map_fn(synthesize_one, label_png_bytes, fn_output_signature=tf.TensorSpec([], tf.string))
        return {IMAGE_PNG_BYTES: pngs}

    return synthesize_png


def build_export_archive(model) -> keras.export.ExportArchive:
    """An ExportArchive holding `model` with the two serving signatures (write it with `write_out`)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default_fn(model),
        input_signature=[tf.TensorSpec([None, None, None], tf.uint8, name=LABEL_IDS)],
    )
    archive.add_endpoint(
        SYNTHESIZE_PNG,
        synthesize_png_fn(model),
        input_signature=[tf.TensorSpec([None], tf.string, name=LABEL_PNG_BYTES)],
    )
    return archive
