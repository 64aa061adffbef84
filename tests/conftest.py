"""Shared test set-up: quiet TensorFlow, two logical CPU devices (so MirroredStrategy really runs
on 2 replicas), and small helpers for tiny models and layouts."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must run before TensorFlow initialises its devices (i.e. before any op).
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "samples"


@pytest.fixture
def samples_dir() -> pathlib.Path:
    if not SAMPLES.is_dir():
        pytest.fail(f"sample data not found at {SAMPLES}: the repo expects ../shared/samples beside it")
    return SAMPLES


def random_ids(shape, num_classes=19, seed=0, void_fraction=0.1):
    """Random train ids uint8 with some void (255) pixels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_classes, size=shape).astype(np.uint8)
    ids[rng.random(shape) < void_fraction] = 255
    return ids


def random_layout(shape, num_classes=19, seed=0):
    """A random one-hot layout float32 [N, H, W, num_classes + 1]."""
    from crn_tf.labels import one_hot

    return one_hot(random_ids(shape, num_classes, seed), num_classes)
