"""Summaries: the TensorBoard scalars of a training step and the sample grids (layout | synthesized | reference)
written to model_dir/samples/ and to TensorBoard.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels
from crn_tf.png import encode_png


def colorize_layout(layout, label_space: labels.LabelSpace) -> np.ndarray:
    """One-hot [N, H, W, C+1] -> colour layouts uint8 [N, H, W, 3] (void black)."""
    ids = np.argmax(np.asarray(layout), axis=-1)
    ids = np.where(ids >= label_space.num_classes, labels.VOID_ID, ids).astype(np.uint8)
    return label_space.color_table()[ids]


def sample_grid(model, batch: dict, label_space: labels.LabelSpace, num_outputs: int, max_rows: int = 4) -> np.ndarray:
    """uint8 [rows * H, (k + 2) * W, 3]: per example, layout | k synthesized images | reference."""
    layout = batch["layout"][:max_rows]
    fake = np.clip(np.asarray(model(layout, training=False), np.float32), 0, 255).round().astype(np.uint8)
    columns = [colorize_layout(layout, label_space)]
    columns += [fake[..., 3 * u : 3 * u + 3] for u in range(num_outputs)]
    columns.append(np.clip(np.asarray(batch["image"][:max_rows]), 0, 255).round().astype(np.uint8))
    rows = np.concatenate(columns, axis=2)  # [N, H, (k+2) W, 3]
    return np.concatenate(list(rows), axis=0)


def write_scalars(
    writer, step: int, terms: dict, loss, learning_rate: float, batch_size: int, steps_per_second: float
) -> None:
    """Loss terms, the loss's layer weights, the learning rate and the speed at `step`."""
    with writer.as_default(step=step):
        tf.summary.scalar("loss/total", terms["total"])
        for name, value in terms.items():
            if name != "total":
                tf.summary.scalar(f"loss_terms/{name}", value)
        for name, weight in zip(loss.layer_names, loss.layer_weights.numpy()):
            tf.summary.scalar(f"layer_weights/{name}", weight)
        tf.summary.scalar("learning_rate", float(learning_rate))
        tf.summary.scalar("speed/steps_per_second", steps_per_second)
        tf.summary.scalar("speed/images_per_second", steps_per_second * batch_size)


def write_sample_grid(grid: np.ndarray, step: int, writer=None, samples_dir: str | None = None) -> None:
    """A sample grid as a TensorBoard image (if `writer`) and/or `samples_dir`/step_<N>.png (if given)."""
    if writer is not None:
        with writer.as_default(step=step):
            tf.summary.image("layout | synthesized | reference", grid[None].astype(np.float32) / 255.0)
    if samples_dir:
        tf.io.gfile.makedirs(samples_dir)
        fileio.atomic_write(f"{samples_dir}/step_{step:08d}.png", encode_png(grid))
