"""Shared test set-up: quiet TensorFlow, two logical CPU devices (so MirroredStrategy really runs
on 2 replicas), and small helpers for tiny models and layouts."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The JAX processes the tests start (tests/test_backends.py, test_jax_train.py, test_readme.py) compile
# the same initializers and steps: one persistent compilation cache for all of them (keyed by JAX's
# version, flags and the computation, so a stale entry is never used) saves ~10-20 s per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "crn_tf_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import base64  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402


def pytest_configure(config):
    """Two logical CPU devices, before TensorFlow initialises its devices (i.e. before any op, and
    before test modules are collected). The pytest-xdist controller runs no test and skips this, so
    it never imports TensorFlow (whose start-up lines would otherwise follow the summary line)."""
    if config.getoption("numprocesses", default=None) and not hasattr(config, "workerinput"):
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    # A worker subprocess that started TensorFlow first and imports these helpers keeps its devices.
    with contextlib.suppress(RuntimeError):
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )


ROOT = pathlib.Path(__file__).resolve().parents[1]
# Everything the tests read lives inside the repo (a clone has nothing beside it):
# tests/data/ holds the real Cityscapes pairs and one 512p layout (see tests/data/README.md),
# examples/layouts/ the real 256p Cityscapes and GTA5 layouts.
TEST_DATA = ROOT / "tests" / "data"
EXAMPLE_LAYOUTS = ROOT / "examples" / "layouts"
CITYSCAPES_256P = sorted(EXAMPLE_LAYOUTS.glob("cityscapes_256p_*.png"))  # 6 RGB colour layouts
GTA_PALETTE = EXAMPLE_LAYOUTS / "gta_256p_00100370.png"  # palette-mode PNG
CITYSCAPES_PAIRS = TEST_DATA / "cityscapes_pairs"


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


def make_pairs(n, height=16, width=32, seed=0, num_classes=19, void_corner=False):
    """Layouts of a few rectangles and photos that follow them (per-class colour + noise), as the
    batches a Trainer takes: {"layout": float32 one-hot [n, H, W, C+1], "image": float32 [n, H, W, 3]}."""
    from crn_tf import labels

    rng = np.random.default_rng(seed)
    ids = np.zeros([n, height, width], np.uint8)
    for i in range(n):
        for _ in range(4):
            y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
            ids[i, y : y + rng.integers(4, height), x : x + rng.integers(4, width)] = rng.integers(0, num_classes)
    if void_corner:
        ids[:, 0, 0] = 255
    colours = labels.CITYSCAPES.color_table().astype(np.float32)
    images = colours[ids] * 0.8 + rng.normal(0, 8, [n, height, width, 3])
    return {"layout": labels.one_hot(ids, num_classes).numpy(), "image": np.clip(images, 0, 255).astype(np.float32)}


def png_bytes(array) -> bytes:
    """An array as PNG file bytes (uint8 [H, W] or [H, W, C]; PIL picks the mode)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    """Bytes as TF Serving's REST API carries them: {"b64": base64 text}."""
    return {"b64": base64.b64encode(data).decode("ascii")}


def converted_synthetic(root, splits, height, width) -> str:
    """Synthetic street scenes converted to TFRecords under `root`/tfr: `splits` = [(split, count, seed)]."""
    from data_tools import cityscapes, common, synthetic

    for split, count, seed in splits:
        synthetic.generate(str(root / "cityscapes"), split, count, height, width, seed=seed)
        common.convert(cityscapes.make_source(str(root / "cityscapes"), split), str(root / "tfr"), split, num_shards=2)
    return str(root / "tfr")
