"""Runs a CRN, VGG-19 and the loss on whichever Keras backend KERAS_BACKEND names, and writes what
tests/test_backends.py compares across backends (the backend is fixed when Keras is imported, so each
backend runs in its own process):

    KERAS_BACKEND=tensorflow python tests/backend_probe.py tiny,paper3 WORK_DIR tf --make_weights
    KERAS_BACKEND=jax python tests/backend_probe.py tiny,paper3 WORK_DIR jax --remat=paper3

Per config C: with --make_weights the weights (the CRN's with its norms' scales and offsets
randomised, and a seeded random VGG-19's) and the inputs are drawn and written to
WORK_DIR/weights_C.npz; otherwise they are read from it. WORK_DIR/<tag>_C.npz holds the outputs
(inference and training mode), the VGG features of the output, every loss term and the gradient of
the mean total loss for every trainable weight, by name.
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np
from keras import ops

from crn_tf.api import one_hot
from crn_tf.config import CRNConfig, get_preset
from crn_tf.losses import CRNLoss
from crn_tf.model import build_model
from crn_tf.vgg import VGGFeatures

CONFIGS = {
    "tiny": lambda: get_preset("tiny"),
    # The paper's module (layer norm, aligned-corner upsampling, 19 classes + void) in 3 modules at
    # small widths, with k = 3 images and the class diversity loss (eq. 3).
    "paper3": lambda: CRNConfig(name="paper3", num_classes=19, widths=(64, 64, 32), num_outputs=3),
}


def gradients(model, loss, layout, real):
    """{variable path: d mean(total) / d variable} on this backend, and the loss terms."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            terms = loss(real, model(layout, training=True), layout)
            total = tf.reduce_mean(terms["total"])
        grads = tape.gradient(total, model.trainable_variables)
    elif backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def mean_total(trainable):
            fake, _ = model.stateless_call(trainable, non_trainable, layout, training=True)
            terms = loss(real, fake, layout)
            return ops.mean(terms["total"]), terms

        grads, terms = jax.grad(mean_total, has_aux=True)(trainable)
    else:
        raise SystemExit(f"backend_probe: no gradient code for backend {backend!r}")
    return {v.path: ops.convert_to_numpy(g) for v, g in zip(model.trainable_variables, grads)}, terms


def probe(name: str, weights_path: str, out_path: str, make_weights: bool, remat: bool) -> int:
    """One config's outputs, features, terms and gradients; returns the number of gradients."""
    config = CONFIGS[name]()
    model = build_model(config)
    vgg = VGGFeatures(weights="none", seed=3)
    named = {f"crn:{v.path}": v for v in model.weights} | {f"vgg:{v.path}": v for v in vgg.weights}
    if make_weights:
        rng = np.random.default_rng(0)
        for key, v in named.items():
            if key.endswith(("gamma", "beta", "bias")):  # not the identity init: the norms' place matters
                v.assign(rng.normal(size=v.shape).astype("float32") * 0.5 + (1.0 if key.endswith("gamma") else 0.0))
        if config.num_outputs > 1:
            # Image u brighter by ~77u grey levels: for every class one image is best by a wide margin.
            # The diversity loss takes a minimum over the k images; where two nearly tie, float round-off
            # on one backend can pick the other image, and its gradient goes elsewhere (seen: 0.4% of a
            # kernel gradient's largest value). A clear winner keeps the comparison about the kernels.
            bias = named["crn:crn/head/conv/bias"]
            offsets = np.repeat(0.6 * np.arange(config.num_outputs), 3).astype("float32")
            bias.assign(ops.convert_to_numpy(bias) + offsets)
        ids = rng.integers(0, config.num_classes + 1, size=(2, 16, 32))  # the last id is void
        stored = {key: ops.convert_to_numpy(v) for key, v in named.items()}
        stored["input:layout"] = one_hot(ids, config.num_classes)
        stored["input:real"] = rng.uniform(0, 255, size=(2, 16, 32, 3)).astype("float32")
        np.savez(weights_path, **stored)
    stored = np.load(weights_path)
    for key, v in named.items():
        v.assign(stored[key])
    layout, real = stored["input:layout"], stored["input:real"]

    model.remat = vgg.remat = remat
    loss = CRNLoss(
        "perceptual", num_outputs=config.num_outputs, layer_weights=config.layer_weights, feature_extractor=vgg
    )
    out = {
        "output": ops.convert_to_numpy(model(layout, training=False)),
        "output_training": ops.convert_to_numpy(model(layout, training=True)),
    }
    for i, f in enumerate(vgg(ops.convert_to_tensor(out["output"][..., :3]))):
        out[f"vgg_{i}"] = ops.convert_to_numpy(f)
    grads, terms = gradients(model, loss, layout, real)
    out |= {f"term:{k}": ops.convert_to_numpy(v) for k, v in terms.items()}
    out |= {f"grad:{k}": v for k, v in grads.items()}
    np.savez(out_path, **out)
    return len(grads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("work_dir")
    parser.add_argument("tag", help="names this backend's outputs: WORK_DIR/<tag>_<config>.npz")
    parser.add_argument("--make_weights", action="store_true")
    parser.add_argument("--remat", default="", help="configs whose modules and VGG blocks recompute in backward")
    args = parser.parse_args(argv)
    for name in args.configs.split(","):
        count = probe(
            name, f"{args.work_dir}/weights_{name}.npz", f"{args.work_dir}/{args.tag}_{name}.npz", args.make_weights,
            name in args.remat.split(","),
        )  # fmt: skip
        print(f"{name} on {keras.backend.backend()}: {count} gradients")
    print(f"tensorflow imported: {'tensorflow' in sys.modules}")


if __name__ == "__main__":
    main()
