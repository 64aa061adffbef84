"""Evaluation of a CRN on a split: L1, PSNR, SSIM, VGG distance, FID, KID, segmentation scores; `crn-eval`.

    crn-eval --model_dir=/tmp/crn_tiny --data_dir=/tmp/crn_data --split=val --vgg_weights=none --baseline
    # measured: 5 pairs of 16x32 through the tiny model with VGG and the baseline, ~6 s on 2 CPU cores
    # (mostly tf.function tracing). Full-size runs (Cityscapes val at 256x512, k=9) not yet measured.

Writes model_dir/eval_{split}.json and eval_{split}.md (the tables) and prints the tables. Metrics
are in `crn_tf.metrics`.
Synthesized images are clipped to [0, 255] (not rounded to uint8) before they are scored.

For a model with k > 1 outputs every output is scored. Row `model` is the mean over examples of
the mean over the k outputs; row `model_best_of_k` the mean over examples of the best output per
example, chosen separately for each metric (min L1, max PSNR, max SSIM, min perceptual). FID pools
all N * k outputs against the N references (it has no best-of-k); so does KID.

With a segmenter (`crn-eval --segmenter=PATH`, see `crn_tf.segmenter`) every synthesized photo, the
baseline's paintings and the split's real photos are segmented and compared with the ground-truth
layout: mean IoU, per-class IoU and pixel accuracy over all pixels of the split (void excluded; one
confusion matrix per row, accumulated batch by batch). Row `real_photos` is the ceiling: what the
segmenter achieves on the photos the layouts were drawn from.

The optional baseline row `baseline_class_mean_colour` paints each pixel with the mean reference
colour of its class. The means are fitted on the evaluated references themselves (a first pass over
the data) unless given, so the baseline knows each class's average appearance on this very split:
a model that beats it on L1 has learnt more than the layout's colours.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from crn_tf import labels, metrics
from crn_tf.model import split_outputs
from crn_tf.progress import Progress
from crn_tf.vgg import VGGFeatures, describe_weights

METRIC_NAMES = ("l1", "psnr", "ssim", "perceptual", "fid", "kid", "miou", "pixel_accuracy")
SEGMENTATION_METRICS = ("miou", "pixel_accuracy")
HIGHER_IS_BETTER = {
    "l1": False, "psnr": True, "ssim": True, "perceptual": False, "fid": False, "kid": False, "miou": True,
    "pixel_accuracy": True,
}  # fmt: skip
METRIC_DESCRIPTIONS = {
    "l1": "mean absolute difference to the reference, 0..255 units, mean over images",
    "psnr": "PSNR in dB (data range 255), mean over images of the per-image value",
    "ssim": "SSIM (tf.image.ssim, max_val 255), mean over images",
    "perceptual": "paper eq. 1 distance to the reference (image + VGG-19 conv1_2..conv5_2, weighted)",
    "fid": "Frechet Inception distance to the references (which network: see fid.network and fid.note)",
    "kid": "kernel Inception distance (unbiased MMD^2, cubic polynomial kernel, mean over subsets), same features",
    "miou": "segmenter's mean IoU against the ground-truth layouts (classes present or predicted; void excluded)",
    "pixel_accuracy": "segmenter's share of correctly labelled non-void pixels",
}
ROW_DESCRIPTIONS = {
    "model": "mean over examples of the mean over the model's k outputs",
    "model_best_of_k": "mean over examples of the best of the k outputs, chosen per metric",
    "baseline_class_mean_colour": "each pixel painted with the mean reference colour of its class",
    "real_photos": "the split's real photos through the segmenter: the ceiling for miou and pixel_accuracy",
}


def _batches(dataset: tf.data.Dataset, max_examples: int | None) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """(layout [B, H, W, C+1], image [B, H, W, 3]) batches, the last one cut at max_examples."""
    if max_examples is None and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError("the evaluation dataset repeats forever: pass max_examples (--max_examples)")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max_examples must be >= 1, got {max_examples}")
    seen = 0
    for batch in dataset:
        if not isinstance(batch, dict) or "layout" not in batch or "image" not in batch:
            raise ValueError('evaluation batches must be dicts {"layout": [B,H,W,C+1], "image": [B,H,W,3]}')
        layout, image = batch["layout"], batch["image"]
        if max_examples is not None:
            layout, image = layout[: max_examples - seen], image[: max_examples - seen]
        seen += int(layout.shape[0])
        yield tf.cast(layout, tf.float32), tf.cast(image, tf.float32)
        if max_examples is not None and seen >= max_examples:
            return


def class_mean_colours(dataset: tf.data.Dataset, max_examples: int | None = None) -> np.ndarray:
    """The mean reference colour of every layout channel (classes and void), float64 [C+1, 3].

    A channel that never occurs gets the mean colour of all pixels.
    """
    sums, counts, total, pixels = None, None, np.zeros(3), 0.0
    for layout, image in _batches(dataset, max_examples):
        batch_sums = tf.einsum("nhwc,nhwd->cd", layout, image).numpy().astype(np.float64)  # [C+1, 3]
        batch_counts = tf.reduce_sum(layout, axis=[0, 1, 2]).numpy().astype(np.float64)  # [C+1]
        sums = batch_sums if sums is None else sums + batch_sums
        counts = batch_counts if counts is None else counts + batch_counts
        total += tf.reduce_sum(image, axis=[0, 1, 2]).numpy()
        pixels += float(np.prod(image.shape[:3]))
    if sums is None:
        raise ValueError("the evaluation dataset is empty")
    overall = total / pixels
    return np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1e-12), overall[None])


def class_mean_prediction(layout, means) -> tf.Tensor:
    """Paints each pixel with its class's colour: layout [N, H, W, C+1], means [C+1, 3] -> [N, H, W, 3]."""
    layout = tf.cast(layout, tf.float32)
    weights = layout / tf.maximum(tf.reduce_sum(layout, axis=-1, keepdims=True), 1e-12)  # soft layouts too
    return tf.einsum("nhwc,cd->nhwd", weights, tf.constant(means, tf.float32))


def _aggregate(values: list[np.ndarray], best: bool, higher_is_better: bool) -> float:
    """Mean over examples of the mean (or best) over outputs; values: [B, k] arrays."""
    per_example = np.concatenate(values, axis=0)  # [N, k]
    if best:
        per_example = per_example.max(axis=1) if higher_is_better else per_example.min(axis=1)
    else:
        per_example = per_example.mean(axis=1)
    return float(per_example.mean())


def evaluate(
    model,
    dataset: tf.data.Dataset,
    *,
    vgg: VGGFeatures | str | None = "imagenet",
    layer_weights: Sequence[float] | None = None,
    inception: Callable | None = None,
    fid_note: str | None = None,
    baseline: bool = False,
    class_means: np.ndarray | None = None,
    segmenter: Callable | None = None,
    segmenter_info: dict | None = None,
    class_names: Sequence[str] | None = None,
    max_examples: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Scores a CRN on a dataset of pairs; returns a JSON-ready dict (see the module docstring).

    Args:
        model: a CascadedRefinementNetwork (anything with `crn_config` mapping a layout
            [B, H, W, C+1] to RGB [B, H, W, 3k]).
        dataset: finite tf.data.Dataset of batches {"layout": float32 [B, H, W, C+1],
            "image": float32 [B, H, W, 3] in [0, 255]} (crn_tf.data.make_dataset's contract).
        vgg: VGG-19 weights for the perceptual distance (`imagenet`, `none`, a path), a built
            VGGFeatures, or None to skip the perceptual metric.
        layer_weights: perceptual layer weights in config.LOSS_LAYERS order; default the model
            config's (all 1 if it has none).
        inception: a feature extractor for FID and KID (`metrics.StandardInception`,
            `metrics.InceptionFeatures`, or any callable RGB [M, H, W, 3] -> [M, D]); None skips
            them. Its `name` and `comparable` attributes, where it has them, go into the report;
            an extractor without `comparable` is reported as not comparable with papers.
        fid_note: the line to report about FID: which network, or why it was skipped.
        baseline: add the per-class mean colour baseline row.
        class_means: precomputed baseline colours [C+1, 3]; default fitted on this dataset (a first pass).
        segmenter: RGB [M, H, W, 3] in [0, 255] -> train ids of the model's label space [M, H, W]
            (a `crn_tf.segmenter.Segmenter` composed with its `LabelMapping`); None skips mIoU.
        segmenter_info: what to record about the segmenter and its label mapping.
        class_names: names of the C classes for the per-class IoU (default: the config's label space).
        max_examples: evaluate at most this many examples (required if the dataset repeats).
        log: where progress lines go (default: nowhere).
        progress: called with the number of examples done after each batch (a progress bar).

    Returns:
        A dict with `count`, `num_outputs`, `image_size`, `rows` (row name -> metric -> value,
        None where not computed), `segmentation` (per-class IoU per row) and descriptions and notes
        saying how each number was made.
    """
    log = log or (lambda line: None)
    config = model.crn_config
    k = config.num_outputs
    num_classes = config.num_classes
    if isinstance(vgg, str):
        vgg = VGGFeatures(weights=vgg)
    if layer_weights is None:
        layer_weights = config.layer_weights or (1.0,) * 6
    layer_weights = tuple(float(w) for w in layer_weights)
    if class_names is None:
        try:
            class_names = labels.get_label_space(config.label_space).class_names
        except ValueError:  # a palette file that is not here: numbered classes
            class_names = [f"class {i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for a model of {num_classes} classes")
    notes = []

    if baseline and class_means is None:
        log("baseline: fitting per-class mean colours (first pass over the data)")
        class_means = class_mean_colours(dataset, max_examples)
    if class_means is not None:
        class_means = np.asarray(class_means, np.float64)
        if class_means.shape != (config.input_channels, 3):
            raise ValueError(
                f"class_means must be [{config.input_channels}, 3] (classes + void, RGB), got {class_means.shape}"
            )
        baseline = True

    def score(synthesized, reference, window):
        """Per-image metrics of synthesized vs reference [M, H, W, 3] -> dict of [M]."""
        out = {
            "l1": metrics.l1(synthesized, reference),
            "psnr": metrics.psnr(synthesized, reference),
            "ssim": metrics.ssim(synthesized, reference, filter_size=window[0], filter_sigma=window[1]),
        }
        if vgg is not None:
            out["perceptual"] = metrics.perceptual_distance(synthesized, reference, vgg, layer_weights)
        return out

    @tf.function(reduce_retracing=True)
    def model_step(layout, image, window):
        fake = tf.clip_by_value(tf.cast(model(layout, training=False), tf.float32), 0.0, 255.0)  # [B, H, W, 3k]
        collection = split_outputs(fake, k)  # [B, k, H, W, 3]
        shape = tf.shape(collection)
        flat = tf.reshape(collection, tf.concat([[shape[0] * k], shape[2:]], 0))  # [B*k, H, W, 3], example-major
        scores = score(flat, tf.repeat(image, k, axis=0), window)
        return flat, {name: tf.reshape(v, [-1, k]) for name, v in scores.items()}  # [B, k] each

    @tf.function(reduce_retracing=True)
    def baseline_step(layout, image, window):
        prediction = class_mean_prediction(layout, class_means)
        return prediction, {name: v[:, None] for name, v in score(prediction, image, window).items()}  # [B, 1]

    model_scores: dict[str, list] = {}
    baseline_scores: dict[str, list] = {}
    features = {"model": [], "reference": [], "baseline": []}
    confusion: dict[str, np.ndarray] = {}

    def segment(row: str, images, truth) -> None:
        """Adds the segmenter's confusion matrix of `images` against the ground truth to `row`."""
        matrix = metrics.confusion_matrix(truth, segmenter(images), num_classes)
        confusion[row] = confusion[row] + matrix if row in confusion else matrix

    count, size, window = 0, None, None
    for layout, image in _batches(dataset, max_examples):
        if size is None:
            size = (int(image.shape[1]), int(image.shape[2]))
            window = metrics.ssim_window(*size)
        # Ground truth from the layout itself: its argmax, void (channel C) left out by the confusion matrix.
        truth = tf.argmax(layout, axis=-1, output_type=tf.int32)  # [B, H, W]
        fake, scores = model_step(layout, image, window)
        for name, v in scores.items():
            model_scores.setdefault(name, []).append(v.numpy())
        if segmenter is not None:
            segment("model", fake, tf.repeat(truth, k, axis=0))
            segment("real_photos", image, truth)
        if baseline:
            prediction, scores = baseline_step(layout, image, window)
            for name, v in scores.items():
                baseline_scores.setdefault(name, []).append(v.numpy())
            if segmenter is not None:
                segment("baseline_class_mean_colour", prediction, truth)
        if inception is not None:
            features["model"].append(np.asarray(inception(fake)))
            features["reference"].append(np.asarray(inception(image)))
            if baseline:
                features["baseline"].append(np.asarray(inception(prediction)))
        count += int(image.shape[0])
        log(f"evaluated {count} examples")
        if progress is not None:
            progress(count)
    if count == 0:
        raise ValueError("the evaluation dataset is empty")

    def row(scores: dict, best: bool) -> dict:
        return {
            name: _aggregate(scores[name], best, HIGHER_IS_BETTER[name]) if name in scores else None
            for name in METRIC_NAMES
        }

    rows = {"model": row(model_scores, best=False)}
    if k > 1:
        rows["model_best_of_k"] = row(model_scores, best=True)
    if baseline:
        rows["baseline_class_mean_colour"] = row(baseline_scores, best=False)

    fid_computed = inception is not None and count >= 2
    kid_std, fid_note = _add_fid_kid(rows, features, inception, count, baseline, fid_note, notes)
    network = {"name": getattr(inception, "name", None), "comparable": bool(getattr(inception, "comparable", False))}
    segmentation = None
    if segmenter is not None:
        segmentation = _add_segmentation(rows, confusion, class_names, segmenter_info, k)
    if window[0] != metrics.SSIM_FILTER_SIZE:
        notes.append(
            f"SSIM with a {window[0]}x{window[0]} window (sigma {window[1]:.3g}): the images ({size[0]}x{size[1]}) "
            f"are smaller than the standard 11x11; not comparable to standard SSIM"
        )
    if any(math.isinf(r["psnr"]) for r in rows.values() if r["psnr"] is not None):
        notes.append("PSNR is inf where some synthesized image equals its reference exactly")
    return {
        "count": count,
        "num_outputs": k,
        "image_size": list(size),
        "rows": rows,
        "row_descriptions": {name: ROW_DESCRIPTIONS[name] for name in rows},
        "metrics": {
            name: {"better": "higher" if HIGHER_IS_BETTER[name] else "lower", "description": METRIC_DESCRIPTIONS[name]}
            for name in METRIC_NAMES
        },
        "aggregation": (
            "model: mean over examples of the mean over the k outputs"
            + ("; model_best_of_k: mean over examples of the best output, per metric" if k > 1 else "")
            + ("; FID and KID pool all N*k outputs" if k > 1 and fid_computed else "")
        ),
        "ssim_window": {"size": window[0], "sigma": window[1]},
        "perceptual": {
            "vgg": describe_weights(vgg.weights_source) if vgg is not None else "skipped (no VGG)",
            "layer_weights": list(layer_weights) if vgg is not None else None,
        },
        "fid": {
            "computed": fid_computed,
            "note": fid_note,
            "network": network["name"] if fid_computed else None,
            "comparable_with_papers": network["comparable"] if fid_computed else None,
            "kid_std_over_subsets": kid_std,
            "kid_subsets": {"count": metrics.KID_SUBSETS, "size": metrics.KID_SUBSET_SIZE} if fid_computed else None,
        },
        "segmentation": segmentation,
        "class_mean_colours": class_means.round(3).tolist() if class_means is not None else None,
        "notes": notes,
    }


def _add_fid_kid(rows: dict, features: dict, inception, count: int, baseline: bool, fid_note, notes: list):
    """Adds FID and KID to the model (and baseline) rows where they can be computed (an extractor, >= 2 images);
    appends a note on a small reference set. Returns (KID's std over subsets per row, the FID note)."""
    kid_std = {}
    if inception is not None and count >= 2:
        reference = np.concatenate(features["reference"])
        sets = {"model": features["model"], "baseline_class_mean_colour": features["baseline"] if baseline else []}
        for name, parts in sets.items():
            if parts:
                synthesized = np.concatenate(parts)
                rows[name]["fid"] = metrics.fid(synthesized, reference)
                rows[name]["kid"], kid_std[name] = metrics.kernel_inception_distance(synthesized, reference)
        if hasattr(inception, "description"):
            fid_note = fid_note or inception.description
        else:
            fid_note = f"{fid_note}. {metrics.OTHER_NETWORK_NOTE}" if fid_note else metrics.OTHER_NETWORK_NOTE
        if count < 2048:
            notes.append(f"FID from {count} reference images (< 2048 feature dimensions): biased upward; KID is not")
    elif inception is not None:
        fid_note = "FID and KID skipped: they need at least 2 images"
    else:
        fid_note = fid_note or "FID skipped: no Inception feature extractor given"
    return kid_std, fid_note


def _add_segmentation(rows: dict, confusion: dict, class_names, segmenter_info: dict | None, k: int) -> dict:
    """Adds mIoU and pixel accuracy to each row with a confusion matrix (and an empty real_photos row);
    returns the report's segmentation section (per-class IoU per row, how it was aggregated)."""
    rows["real_photos"] = {name: None for name in METRIC_NAMES}
    per_class = {}
    outside = {}
    for name, matrix in confusion.items():
        scores = metrics.segmentation_scores(matrix)
        rows[name]["miou"], rows[name]["pixel_accuracy"] = scores["miou"], scores["pixel_accuracy"]
        per_class[name] = scores["per_class_iou"]
        outside[name] = scores["pixels_predicted_outside_label_space"]
    truth_pixels = confusion["real_photos"].sum(axis=1)
    segmentation = {
        "class_names": list(class_names),
        "per_class_iou": per_class,
        "ground_truth_pixels": truth_pixels.tolist(),
        "pixels_predicted_outside_label_space": outside,
        "segmenter": segmenter_info or {},
        "aggregation": (
            "one confusion matrix per row over every non-void pixel of the split"
            + (" (all N*k outputs of the model)" if k > 1 else "")
            + "; IoU = TP / (TP + FP + FN) per class; miou = mean over the classes that occur in the ground "
            "truth or the prediction (the others have no IoU: null); pixel_accuracy = correct / non-void pixels"
        ),
    }
    return segmentation


def _shown_metrics(results: dict) -> list[str]:
    """The table's columns: every metric, the segmentation ones only when a segmenter ran."""
    return [m for m in METRIC_NAMES if m not in SEGMENTATION_METRICS or results.get("segmentation")]


def format_table(results: dict) -> str:
    """The rows of `evaluate`'s result as a markdown table (arrows: which way is better)."""
    names = _shown_metrics(results)
    header = ["row"] + [f"{name} {'↑' if HIGHER_IS_BETTER[name] else '↓'}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in results["rows"].items():
        cells = [name] + ["n/a" if values[m] is None else f"{values[m]:.4g}" for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_class_table(results: dict) -> str | None:
    """Per-class IoU of every segmented row as a markdown table (None without a segmenter)."""
    segmentation = results.get("segmentation")
    if not segmentation:
        return None
    rows = list(segmentation["per_class_iou"])
    lines = ["| class | ground-truth pixels | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 2)]
    for c, name in enumerate(segmentation["class_names"]):
        values = [segmentation["per_class_iou"][r][c] for r in rows]
        cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {name} | {segmentation['ground_truth_pixels'][c]} | " + " | ".join(cells) + " |")
    means = ["n/a" if results["rows"][r]["miou"] is None else f"{results['rows'][r]['miou']:.3f}" for r in rows]
    lines.append("| **mean IoU** | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def format_markdown(results: dict, title: str = "crn-eval") -> str:
    """The whole report as Markdown: overall table, per-class IoU, and how each figure was made."""
    parts = [f"# {title}", "", f"{results['count']} examples at {results['image_size'][0]}x{results['image_size'][1]}"]
    parts += ["", "## Overall", "", format_table(results), ""]
    parts += [f"- `{name}`: {ROW_DESCRIPTIONS[name]}" for name in results["rows"]]
    class_table = format_class_table(results)
    if class_table:
        segmentation = results["segmentation"]
        parts += ["", "## Per-class IoU", "", class_table, "", f"- {segmentation['aggregation']}"]
        for key in ("description", "label_mapping"):
            if segmentation["segmenter"].get(key):
                parts.append(f"- {segmentation['segmenter'][key]}")
    parts += ["", "## Notes", "", f"- {results['fid']['note']}", f"- {results['perceptual']['vgg']}"]
    parts += [f"- {note}" for note in results["notes"]]
    return "\n".join(parts) + "\n"


# ---- crn-eval CLI -------------------------------------------------------------------------------


def define_flags(flag_values=None) -> None:
    """Defines crn-eval's flags (on absl's global FLAGS unless given): called by `run()`, never at import."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string(
        "model_dir", None, "model_dir (latest checkpoint), checkpoint prefix, or .keras.", flag_values=fv
    )
    flags.DEFINE_string("data_dir", None, "Directory of TFRecord shards + {split}.json (crn-convert).", flag_values=fv)
    flags.DEFINE_string("split", "val", "Split to evaluate.", flag_values=fv)
    flags.DEFINE_string("size", None, "Evaluation size HxW (default: the model's native size).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 1, "Examples per batch.", flag_values=fv)
    flags.DEFINE_string(
        "vgg_weights", "imagenet", "VGG-19 for the perceptual distance: imagenet, none, or a file.", flag_values=fv
    )
    flags.DEFINE_string(
        "perceptual_weights",
        "model",
        "Layer weights of the perceptual distance: model (its config's), uniform, or 6 comma-separated numbers.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "inception_weights",
        None,
        "Keras InceptionV3 weights file for FID/KID (default: Keras' cache, if there); not comparable to papers.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "fid_inception_graph",
        None,
        f"The standard FID network: {metrics.FID_GRAPH_FILENAME} (or {metrics.FID_GRAPH_ARCHIVE}) of the original "
        "FID code. Preferred over --inception_weights.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "segmenter", None, "Segmentation SavedModel for mIoU / pixel accuracy (e.g. a DeepLab export).", flag_values=fv
    )
    flags.DEFINE_string(
        "segmenter_signature", None, "Its signature (default: the only one, else serving_default).", flag_values=fv
    )
    flags.DEFINE_string("segmenter_input", None, "Its image input (default: the only input).", flag_values=fv)
    flags.DEFINE_string(
        "segmenter_output", None, "Its output (default: the only one, else logits, else the only float one).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_enum(
        "segmenter_output_kind", "auto", ["auto", "logits", "ids"], "auto: float = logits, int = ids.", flag_values=fv
    )
    flags.DEFINE_string(
        "segmenter_label_map",
        None,
        "Segmenter class -> train id: identity, cityscapes_labelids, or a JSON file {id: train id, 255 = none}. "
        "Default: by class name if the SavedModel has assets.extra/label_space.json, else identity when the "
        "counts agree.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "segmenter_size", None, "Resize images to HxW for the segmenter (default: as evaluated).", flag_values=fv
    )
    flags.DEFINE_integer("max_examples", None, "Evaluate at most this many examples.", flag_values=fv)
    flags.DEFINE_string(
        "output_json", None, "Where to write results (default: model_dir/eval_{split}.json).", flag_values=fv
    )
    flags.DEFINE_string(
        "output_markdown", None, "Where to write the tables (default: the JSON's name with .md).", flag_values=fv
    )
    flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)
    flags.DEFINE_boolean("baseline", False, "Add the per-class mean colour baseline row.", flag_values=fv)


def parse_perceptual_weights(value: str, model_weights: Sequence[float] | None) -> tuple[float, ...]:
    """`--perceptual_weights`: `model` (the config's, all 1 if none), `uniform`, or 6 numbers."""
    if value == "model":
        return tuple(model_weights) if model_weights else (1.0,) * 6
    if value == "uniform":
        return (1.0,) * 6
    try:
        weights = tuple(float(v) for v in value.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 6:
        raise ValueError(f"--perceptual_weights={value!r}: expected model, uniform, or 6 comma-separated numbers")
    return weights


def default_output_json(model_path: str, split: str) -> str:
    """model_dir/eval_{split}.json; beside the file for a checkpoint prefix or a .keras file."""
    directory = model_path if tf.io.gfile.isdir(model_path) else model_path.rsplit("/", 1)[0] or "."
    return f"{directory.rstrip('/')}/eval_{split}.json"


def load_segmenter(f, space: labels.LabelSpace):
    """The segmenter of the --segmenter* flags composed with its label mapping, and what to record."""
    from crn_tf.config import parse_size
    from crn_tf.segmenter import Segmenter, resolve_label_mapping

    segmenter = Segmenter(
        f.segmenter,
        signature=f.segmenter_signature,
        input_name=f.segmenter_input,
        output_name=f.segmenter_output,
        output_kind=f.segmenter_output_kind,
        size=parse_size(f.segmenter_size, "--segmenter_size"),
    )
    mapping = resolve_label_mapping(segmenter, space, f.segmenter_label_map)
    info = {
        "path": f.segmenter,
        "description": segmenter.description,
        "signature": segmenter.signature_name,
        "input": segmenter.input_name,
        "output": segmenter.output_name,
        "output_kind": segmenter.output_kind,
        "num_classes": segmenter.num_classes,
        "label_mapping": mapping.statement["text"],
        "label_mapping_pairs": mapping.statement["pairs"],
    }
    return (lambda images: mapping(segmenter(images))), info


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What crn-eval evaluates and how (each field is the crn-eval flag of the same name; see define_flags)."""

    model_dir: str
    data_dir: str
    split: str = "val"
    size: str | None = None
    batch_size: int = 1
    vgg_weights: str = "imagenet"
    perceptual_weights: str = "model"
    inception_weights: str | None = None
    fid_inception_graph: str | None = None
    segmenter: str | None = None
    segmenter_signature: str | None = None
    segmenter_input: str | None = None
    segmenter_output: str | None = None
    segmenter_output_kind: str = "auto"
    segmenter_label_map: str | None = None
    segmenter_size: str | None = None
    max_examples: int | None = None
    output_json: str | None = None
    output_markdown: str | None = None
    progress: bool = True
    baseline: bool = False


def evaluate_model_dir(f: EvalOptions, log=print) -> dict:
    """crn-eval's job: evaluates a model_dir on a converted split, writes the JSON and Markdown results
    (default: model_dir/eval_{split}.json and .md), prints the tables; returns the results.

    Raises:
        ValueError: an unreadable model, data or option, naming the file or flag.
    """
    from crn_tf import data, fileio
    from crn_tf.config import parse_size
    from crn_tf.model_dir import load_model

    model = load_model(f.model_dir)  # a ValueError names the file of a bad model_dir or checkpoint
    config = model.crn_config
    size = parse_size(f.size, "--size") or config.native_size
    layer_weights = parse_perceptual_weights(f.perceptual_weights, config.layer_weights)
    inception, fid_note = metrics.load_fid_network(f.fid_inception_graph, f.inception_weights)
    manifest = data.load_manifest(f.data_dir, f.split)
    space = data.manifest_label_space(manifest, data.manifest_path(f.data_dir, f.split))
    segmenter, segmenter_info = load_segmenter(f, space) if f.segmenter else (None, None)
    log(f"model: {f.model_dir} ({config.name}, k={config.num_outputs}); data: {f.data_dir} split {f.split}")
    log(describe_weights(f.vgg_weights))
    log(fid_note)
    if segmenter_info:
        log(segmenter_info["description"])
        log(segmenter_info["label_mapping"])
    dataset = data.make_dataset(
        f.data_dir, f.split, batch_size=f.batch_size, image_size=size, config=config, training=False
    )
    total = min(int(manifest["count"]), f.max_examples or int(manifest["count"]))
    bar = Progress(total, unit="examples", enabled=f.progress)
    results = evaluate(
        model,
        dataset,
        vgg=f.vgg_weights,
        layer_weights=layer_weights,
        inception=inception,
        fid_note=fid_note,
        baseline=f.baseline,
        segmenter=segmenter,
        segmenter_info=segmenter_info,
        class_names=space.class_names,
        max_examples=f.max_examples,
        progress=bar.update,
    )
    bar.finish()
    results.update(model=f.model_dir, data_dir=f.data_dir, split=f.split)
    output = f.output_json or default_output_json(f.model_dir, f.split)
    markdown = f.output_markdown or os.path.splitext(output)[0] + ".md"
    fileio.write_json(output, results)
    fileio.atomic_write(markdown, format_markdown(results, title=f"crn-eval: {f.model_dir}, {f.data_dir} {f.split}"))
    log(format_table(results))
    class_table = format_class_table(results)
    if class_table:
        log(class_table)
    for note in [results["fid"]["note"], *results["notes"]]:
        log(f"note: {note}")
    log(f"wrote {output} and {markdown}")
    return results


def main(argv, flag_values=None) -> None:
    from absl import app, flags

    from crn_tf import fileio

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values if flag_values is not None else flags.FLAGS
    fileio.quiet_absl_logging()
    for name in ("model_dir", "data_dir"):
        if not f[name].value:
            raise app.UsageError(f"--{name} is required")
    try:
        evaluate_model_dir(
            EvalOptions(**{field.name: f[field.name].value for field in dataclasses.fields(EvalOptions)})
        )
    except ValueError as e:  # not a model_dir, an unreadable checkpoint, bad data: the message names the file
        sys.exit(f"crn-eval: {e}")


def run() -> None:
    """Console entry point of crn-eval."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
