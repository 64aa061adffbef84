"""The JAX trainer's step, run with KERAS_BACKEND=jax for tests/test_jax_train.py (the backend is fixed
when Keras is imported, so JAX runs in its own process):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python tests/jax_probe.py WORK_DIR INIT_FROM_MODEL_DIR OUT.npz

On one fixed batch of 2: one step of a one-device JaxTrainer and one of a trainer whose batch is split
over 2 devices (keras.distribution.DataParallel), from the same seed; then 6 more one-device steps
(the loss per step); then a trainer started with --init_from a TensorFlow-written model_dir. Writes
the initial and updated weights, the losses and the initialised weights to OUT.npz.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import tensorflow as tf

from crn_tf.api import one_hot
from crn_tf.config import get_preset
from crn_tf.experiment import TrainConfig
from crn_tf.jax_trainer import JaxTrainer, make_distribution


def quiet(*args, **kwargs):
    pass


def main(work_dir: str, init_source: str, out: str) -> None:
    import jax

    assert len(jax.devices()) == 2, f"expected 2 CPU devices (XLA_FLAGS), got {jax.devices()}"
    config = get_preset("tiny")
    tc = TrainConfig(batch_size=2, vgg_weights="none", learning_rate=1e-3, steps=100, image_every=10**6)
    rng = np.random.default_rng(0)
    batch = {
        "layout": one_hot(rng.integers(0, 20, (2, 16, 32)), config.num_classes),
        "image": rng.uniform(0, 255, (2, 16, 32, 3)).astype("float32"),
    }
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    results = {}
    trainers = {}
    for name, distribution in (("one", None), ("two", make_distribution("auto"))):
        trainer = JaxTrainer(config, tc, f"{work_dir}/{name}", log=quiet, distribution=distribution)
        trainer.initialize()
        results[f"{name}_initial"] = np.concatenate([np.ravel(v) for v in trainer.model.trainable_variables])
        iterator = trainer._iterator(dataset)
        terms, finite, applied = trainer.train_step(iterator)
        assert applied and finite.all() and trainer.current_step() == 1
        trainer._sync()
        results[f"{name}_updated"] = np.concatenate([np.ravel(v) for v in trainer.model.trainable_variables])
        results[f"{name}_loss"] = np.float64(terms["total"])
        trainers[name] = (trainer, iterator)
    trainer, iterator = trainers["one"]
    results["losses"] = np.array([trainer.train_step(iterator)[0]["total"] for _ in range(6)])
    trainer.save()
    for t, _ in trainers.values():
        t.close()
    started = JaxTrainer(config, dataclasses.replace(tc, init_from=init_source), f"{work_dir}/init", log=quiet)
    results["init_from_message"] = np.array(started.initialize())
    results["init_from_weights"] = np.concatenate([np.ravel(v) for v in started.model.weights])
    started.close()
    np.savez(out, **results)
    print(f"devices: {len(jax.devices())}; tensorflow for the input pipeline: {'tensorflow' in sys.modules}")


if __name__ == "__main__":
    main(*sys.argv[1:])
