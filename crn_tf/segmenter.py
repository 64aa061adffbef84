"""Semantic segmenters for evaluation: a small one trained on converted data, and any SavedModel.

Semantic image synthesis is scored by how well a segmentation network recognises the layout in the
synthesized photo (mean IoU and pixel accuracy; Isola et al. 2017, Wang et al. 2018, Park et al.
2019). Papers use a DeepLab or DRN trained on real Cityscapes; this module

- trains a small fully convolutional segmenter on a converted split (`train_segmenter`, the demo
  and the tests use it on the synthetic street scenes) and exports it as a SavedModel
  (`export_segmenter`): `serving_default`, images uint8 [N, H, W, 3] -> logits float32 [N, H, W, C],
  with its label space in `assets.extra/label_space.json`;
- loads any segmentation SavedModel (`Segmenter`): the signature, its input and output found
  automatically where unambiguous (else named by flags), logits (argmax) or class ids out;
- maps the segmenter's classes onto the evaluated label space (`resolve_label_mapping`): by class
  names when the SavedModel carries a label space, else through a map the user gives, else the
  identity when the class counts agree; the mapping is checked and stated in words.

    python -m crn_tf.segmenter --data_dir=/tmp/crn/tfr --export_dir=/tmp/crn/segmenter --steps=400
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from crn_tf import fileio, labels

LABEL_SPACE_ASSET = "assets.extra/label_space.json"
CONFIG_ASSET = "assets.extra/segmenter_config.json"
OUTPUT_KINDS = ("auto", "logits", "ids")
# Built-in maps for --segmenter_label_map (segmenter id -> label space train id, 255 = no counterpart).
LABEL_MAPS = {"cityscapes_labelids": labels.CITYSCAPES_LABELID_TO_TRAINID}


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """The small segmenter and how it is trained.

    Attributes:
        num_classes: output classes (the label space's, void excluded).
        widths: channels at full, 1/2 and 1/4 resolution.
        steps, batch_size, learning_rate: Adam on randomly flipped batches of the converted split.
        seed: initialisation and data order.
    """

    num_classes: int = 19
    widths: tuple[int, int, int] = (16, 32, 64)
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"segmenter widths must be 3 positive numbers, got {self.widths}")
        if self.num_classes < 1 or self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(
                f"segmenter needs num_classes >= 1, steps >= 0, batch_size >= 1, learning_rate > 0; got "
                f"{self.num_classes}, {self.steps}, {self.batch_size}, {self.learning_rate}"
            )


SIZE_MULTIPLE = 4  # two stride-2 stages


def build_segmenter(config: SegmenterConfig):
    """A small encoder-decoder: uint8 RGB [N, H, W, 3] (H, W multiples of 4) -> logits [N, H, W, C].

    Full resolution (2 convs), 1/2 (2 convs), 1/4 (3 convs, dilations 1, 2, 4 for context: sky is up,
    road is down), nearest x4 upsampling back, concatenated with the full-resolution features, 2 convs.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    w0, w1, w2 = config.widths

    def conv(width, stride=1, dilation=1):
        return keras.layers.Conv2D(width, 3, strides=stride, dilation_rate=dilation, padding="same", activation="relu")

    images = keras.Input([None, None, 3], dtype="uint8", name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(keras.ops.cast(images, "float32"))
    full = conv(w0)(conv(w0)(x))
    x = conv(w1)(conv(w1, stride=2)(full))
    x = conv(w2, dilation=4)(conv(w2, dilation=2)(conv(w2, stride=2)(x)))
    # Nearest x4 (keras.ops.repeat works on unknown sizes; UpSampling2D's bilinear does not), smoothed
    # by the convolution after the concatenation.
    x = keras.ops.repeat(keras.ops.repeat(x, 4, axis=1), 4, axis=2)
    x = conv(w1)(keras.layers.Concatenate()([x, full]))
    logits = keras.layers.Conv2D(config.num_classes, 1, name="logits")(x)
    return keras.Model(images, logits, name="segmenter")


def train_segmenter(config: SegmenterConfig, dataset: tf.data.Dataset, log: Callable = print):
    """Trains `build_segmenter(config)` with cross-entropy over non-void pixels; returns the model.

    Args:
        dataset: repeating batches with "image" float [B, H, W, 3] in [0, 255] and "label_ids" uint8
            [B, H, W] (255 = void): `crn_tf.data.make_dataset(..., training=True)`.
        log: where progress lines go.
    """
    import keras

    from crn_tf.progress import Progress

    model = build_segmenter(config)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def step(image, label_ids):
        ids = tf.cast(label_ids, tf.int32)
        valid = ids < config.num_classes
        with tf.GradientTape() as tape:
            logits = model(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), training=True)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(valid, ids, 0), logits)
            weight = tf.cast(valid, tf.float32)
            loss = tf.reduce_sum(losses * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), ids), tf.float32) * weight
        return loss, tf.reduce_sum(correct) / tf.maximum(tf.reduce_sum(weight), 1.0)

    progress = Progress(config.steps, per_update=config.batch_size, label="step", log=log)
    iterator = iter(dataset)
    for i in range(1, config.steps + 1):
        batch = next(iterator)
        loss, accuracy = step(batch["image"], batch["label_ids"])
        progress.update(i, {"total": float(loss), "pixel_accuracy": float(accuracy)})
    progress.finish(config.steps)
    return model


class _ExportModule(tf.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        # Any size in: pad up to a multiple of 4 (edge pixels repeated), crop the logits back.
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        pad_h, pad_w = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
        padded = tf.pad(images, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], mode="SYMMETRIC")
        return {"logits": self.model(padded, training=False)[:, :height, :width]}


def export_segmenter(model, export_dir: str, label_space: labels.LabelSpace, config: SegmenterConfig) -> str:
    """Writes the segmenter as a SavedModel directory (atomically: a temporary sibling, then a rename).

    `serving_default`: images uint8 [N, H, W, 3] (any size) -> {"logits": float32 [N, H, W, C]};
    `assets.extra/label_space.json` names the classes, so crn-eval maps them onto the data's by name.
    """
    if label_space.num_classes != config.num_classes:
        raise ValueError(f"label space {label_space.name!r} has {label_space.num_classes} classes, "
                         f"the segmenter {config.num_classes}")  # fmt: skip
    export_dir = export_dir.rstrip("/")
    tmp = fileio.temporary_name(export_dir)
    module = _ExportModule(model)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        tf.io.gfile.makedirs(f"{tmp}/assets.extra")
        fileio.atomic_write(f"{tmp}/{LABEL_SPACE_ASSET}", label_space.to_json())
        fileio.write_json(f"{tmp}/{CONFIG_ASSET}", dataclasses.asdict(config))
        fileio.replace_directory(tmp, export_dir)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    return export_dir


# ---- loading any segmentation SavedModel ------------------------------------------------------


def _describe_specs(specs: dict) -> str:
    return ", ".join(f"{name} {spec.dtype.name} {spec.shape}" for name, spec in sorted(specs.items()))


class Segmenter:
    """A segmentation SavedModel as a function RGB [N, H, W, 3] in [0, 255] -> class ids int32 [N, H, W].

    Args:
        path: SavedModel directory.
        signature: signature name; default the only one, else `serving_default`.
        input_name: the signature's image input; default its only input.
        output_name: the output to read; default the only output, else `logits`, else the only float
            output of rank 4, else the only integer output.
        output_kind: `logits` (float [N, h, w, K], argmax; scores or probabilities work the same),
            `ids` (int [N, h, w] or [N, h, w, 1]) or `auto` (float -> logits, integer -> ids).
        size: (H, W) to resize the images to (bilinear) before the segmenter, e.g. the size it was
            trained at; its output is resized back to the images' size (bilinear logits, nearest ids).
            None: the images go in at their own size.

    Attributes:
        num_classes: K, the segmenter's classes (from the logits' static shape; None for ids outputs
            of unknown range).
        class_names: from `assets.extra/label_space.json` when the SavedModel has one, else None.
        description: one line saying what was found and how it is used.
    """

    def __init__(
        self,
        path: str,
        signature: str | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        output_kind: str = "auto",
        size: Sequence[int] | None = None,
    ):
        path = path.rstrip("/")
        if not tf.io.gfile.exists(f"{path}/saved_model.pb"):
            raise ValueError(f"--segmenter: {path} is not a SavedModel directory (no saved_model.pb)")
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"--segmenter_output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.path = path
        self._loaded = fileio.load_saved_model(path)  # literally: `run[1]/` is no pattern
        signatures = dict(self._loaded.signatures)
        if not signatures:
            raise ValueError(f"--segmenter: {path} has no signatures; export it with a serving signature")
        if signature is None:
            if len(signatures) == 1:
                signature = next(iter(signatures))
            elif "serving_default" in signatures:
                signature = "serving_default"
            else:
                raise ValueError(
                    f"--segmenter: {path} has signatures {sorted(signatures)}; choose one with --segmenter_signature"
                )
        if signature not in signatures:
            raise ValueError(f"--segmenter_signature={signature!r}: {path} has {sorted(signatures)}")
        self.signature_name = signature
        self._fn = signatures[signature]
        inputs = self._fn.structured_input_signature[1]
        if input_name is None:
            if len(inputs) != 1:
                raise ValueError(
                    f"--segmenter: signature {signature!r} of {path} has inputs {_describe_specs(inputs)}; "
                    "name the image input with --segmenter_input"
                )
            input_name = next(iter(inputs))
        if input_name not in inputs:
            raise ValueError(f"--segmenter_input={input_name!r}: signature {signature!r} has {_describe_specs(inputs)}")
        spec = inputs[input_name]
        if spec.shape.rank not in (None, 4) or (spec.shape.rank == 4 and spec.shape[-1] not in (None, 3)):
            raise ValueError(
                f"--segmenter: input {input_name!r} of {path} is {spec.dtype.name} {spec.shape}; expected images "
                "[N, H, W, 3]"
            )
        if not (spec.dtype.is_integer or spec.dtype.is_floating):
            raise ValueError(
                f"--segmenter: input {input_name!r} of {path} is {spec.dtype.name}; expected uint8 or float"
            )
        self.input_name, self.input_dtype = input_name, spec.dtype
        outputs = self._fn.structured_outputs
        if output_name is None:
            output_name = self._choose_output(outputs)
        if output_name not in outputs:
            raise ValueError(
                f"--segmenter_output={output_name!r}: signature {signature!r} has {_describe_specs(outputs)}"
            )
        out = outputs[output_name]
        if output_kind == "auto":
            output_kind = "logits" if out.dtype.is_floating else "ids"
        if output_kind == "logits" and out.shape.rank not in (None, 4):
            raise ValueError(
                f"--segmenter: output {output_name!r} of {path} is {out.dtype.name} {out.shape}; logits must be "
                "[N, H, W, classes] (pass --segmenter_output_kind=ids if it holds class ids)"
            )
        if output_kind == "ids" and out.shape.rank not in (None, 3, 4):
            raise ValueError(f"--segmenter: output {output_name!r} of {path} is {out.shape}; ids must be [N, H, W]")
        self.output_name, self.output_kind = output_name, output_kind
        self.num_classes = int(out.shape[-1]) if output_kind == "logits" and out.shape[-1] is not None else None
        self.size = tuple(int(v) for v in size) if size else None
        self.class_names = None
        space_path = f"{path}/{LABEL_SPACE_ASSET}"
        if tf.io.gfile.exists(space_path):
            with tf.io.gfile.GFile(space_path) as f:
                self.class_names = labels.LabelSpace.from_json(f.read(), source=space_path).class_names
            if self.num_classes is not None and self.num_classes != len(self.class_names):
                raise ValueError(
                    f"{space_path} names {len(self.class_names)} classes but {path} outputs {self.num_classes} logits"
                )
        self.description = (
            f"segmenter {path}: signature {signature!r}, input {input_name!r} ({spec.dtype.name}, RGB 0..255), "
            f"output {output_name!r} read as {output_kind}"
            + (f" of {self.num_classes} classes" if self.num_classes else "")
            + (f"; images resized to {self.size[0]}x{self.size[1]} for it" if self.size else "")
        )

    def _choose_output(self, outputs: dict) -> str:
        if len(outputs) == 1:
            return next(iter(outputs))
        if "logits" in outputs:
            return "logits"
        floats = [n for n, s in outputs.items() if s.dtype.is_floating and s.shape.rank == 4]
        if len(floats) == 1:
            return floats[0]
        ints = [n for n, s in outputs.items() if s.dtype.is_integer]
        if not floats and len(ints) == 1:
            return ints[0]
        raise ValueError(
            f"--segmenter: signature {self.signature_name!r} of {self.path} has outputs {_describe_specs(outputs)}; "
            "name the logits or class-id output with --segmenter_output"
        )

    def __call__(self, images) -> tf.Tensor:
        """RGB [N, H, W, 3] in [0, 255] -> the segmenter's class ids int32 [N, H, W]."""
        images = tf.cast(tf.convert_to_tensor(images), tf.float32)
        height, width = images.shape[1], images.shape[2]
        if self.size:
            images = tf.image.resize(images, self.size, method="bilinear")
        if self.input_dtype.is_integer:
            images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), self.input_dtype)
        else:
            images = tf.cast(images, self.input_dtype)
        out = self._fn(**{self.input_name: images})[self.output_name]
        if self.output_kind == "logits":
            out = tf.cast(out, tf.float32)
            if out.shape[1] != height or out.shape[2] != width:
                out = tf.image.resize(out, [height, width], method="bilinear")  # as DeepLab upsamples logits
            return tf.argmax(out, axis=-1, output_type=tf.int32)
        if out.shape.rank == 4:
            out = out[..., 0]
        out = tf.cast(out, tf.int32)
        if out.shape[1] != height or out.shape[2] != width:
            out = tf.image.resize(out[..., None], [height, width], method="nearest")[..., 0]
        return out


# ---- label mapping ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    """Segmenter class id -> label-space train id (VOID_ID where the class has no counterpart).

    Attributes:
        table: int32 [K]; segmenter ids >= K map to void (counted as wrong, never as a class).
        source: how the mapping was decided, in words.
        statement: JSON-ready account of every pair and of what has no counterpart.
    """

    table: np.ndarray
    source: str
    statement: dict

    def __call__(self, ids) -> tf.Tensor:
        """Segmenter ids int [N, H, W] -> train ids int32 [N, H, W] (VOID_ID = no counterpart)."""
        ids = tf.cast(ids, tf.int32)
        size = len(self.table)
        inside = (ids >= 0) & (ids < size)
        return tf.where(inside, tf.gather(tf.constant(self.table), tf.clip_by_value(ids, 0, size - 1)), labels.VOID_ID)


def _read_label_map(spec: str) -> dict[int, int]:
    if spec in LABEL_MAPS:
        return dict(LABEL_MAPS[spec])
    try:
        raw = fileio.read_json(spec)
    except ValueError as e:
        raise ValueError(
            f"--segmenter_label_map={spec!r}: expected identity, {', '.join(LABEL_MAPS)} or a JSON file "
            f'{{"segmenter id": train id or 255, ...}} ({e})'
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(f"--segmenter_label_map: {spec} must hold a JSON object {{segmenter id: train id}}")
    try:
        return {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"--segmenter_label_map: {spec}: keys and values must be integers ({e})") from e


def resolve_label_mapping(segmenter: Segmenter, space: labels.LabelSpace, label_map: str | None = None) -> LabelMapping:
    """Decides, checks and states how the segmenter's classes map onto `space`'s train ids.

    Order: `label_map` if given (`identity`, `cityscapes_labelids` for segmenters that predict the 34
    official Cityscapes labelIds, or a JSON file {segmenter id: train id, 255 = none}); else by class
    name when the SavedModel carries `assets.extra/label_space.json`; else the identity when the
    segmenter has as many classes as the space (or its count is unknown), stated as an assumption.

    Raises:
        ValueError: naming the flag or file, when the counts disagree and nothing says how to map,
            or a map names ids outside either side.
    """
    c, k = space.num_classes, segmenter.num_classes
    if label_map and label_map != "identity":
        mapping = _read_label_map(label_map)
        bad = {s: t for s, t in mapping.items() if s < 0 or (k is not None and s >= k) or not (0 <= t < c or t == 255)}
        if bad:
            raise ValueError(
                f"--segmenter_label_map={label_map}: pairs {dict(list(bad.items())[:5])} are outside the segmenter's "
                f"ids 0..{(k or 256) - 1} or the label space's train ids 0..{c - 1} (255 = no counterpart)"
            )
        size = k or (max(mapping) + 1 if mapping else 1)
        table = np.full(size, labels.VOID_ID, np.int32)
        for s, t in mapping.items():
            table[s] = t
        source = f"--segmenter_label_map={label_map}"
    elif label_map == "identity" or segmenter.class_names is None:
        if label_map != "identity" and k is not None and k != c:
            raise ValueError(
                f"--segmenter: {segmenter.path} outputs {k} classes but the label space {space.name!r} has {c}, and "
                "the SavedModel names none of them: pass --segmenter_label_map (identity, "
                f"{', '.join(LABEL_MAPS)}, or a JSON file {{segmenter id: train id}})"
            )
        size = k or c
        table = np.array([i if i < c else labels.VOID_ID for i in range(size)], np.int32)
        source = "--segmenter_label_map=identity" if label_map == "identity" else "assumed identity"
    else:
        index = {name: i for i, name in enumerate(space.class_names)}
        table = np.array([index.get(name, labels.VOID_ID) for name in segmenter.class_names], np.int32)
        source = f"by class name ({segmenter.path}/{LABEL_SPACE_ASSET})"
    names = segmenter.class_names
    pairs = [
        [s, names[s] if names and s < len(names) else None, int(t), space.class_names[t] if t < c else None]
        for s, t in enumerate(table.tolist())
    ]
    unmapped = [p[0] for p in pairs if p[2] == labels.VOID_ID]
    unreachable = [space.class_names[i] for i in range(c) if i not in set(table.tolist())]
    identity = len(table) >= c and all(table[i] == i for i in range(c)) and not unmapped
    text = f"segmenter classes -> {space.name} train ids: {source}; " + (
        f"identity over all {c} classes ({', '.join(space.class_names[:3])}, ...)"
        if identity
        else f"{len(table) - len(unmapped)} of {len(table)} segmenter classes mapped"
    )
    if unmapped:
        text += f"; segmenter ids without a counterpart (counted as wrong): {unmapped[:10]}"
    if unreachable:
        text += f"; classes the segmenter cannot predict (IoU 0 where present): {unreachable}"
    if source == "assumed identity":
        text += ". The SavedModel names no classes: pass --segmenter_label_map if its order differs"
    statement = {"source": source, "text": text, "pairs": pairs, "unmapped_segmenter_ids": unmapped,
                 "unreachable_classes": unreachable}  # fmt: skip
    return LabelMapping(table, source, statement)


# ---- CLI: train and export the small segmenter -------------------------------------------------


def train_and_export(
    data_dir: str, split: str, export_dir: str, size: tuple[int, int] | None, config: SegmenterConfig, log=print
) -> str:
    """Trains the small segmenter on a converted split (its classes: the manifest's) and exports it.

    Args:
        config: the training config; its num_classes is replaced by the data's.
        size: the training size (None: the data's own); multiples of SIZE_MULTIPLE.

    Returns:
        The SavedModel directory written.
    """
    from crn_tf import data

    manifest = data.load_manifest(data_dir, split)
    space = data.manifest_label_space(manifest, data.manifest_path(data_dir, split))
    config = dataclasses.replace(config, num_classes=space.num_classes)
    if size and (size[0] % SIZE_MULTIPLE or size[1] % SIZE_MULTIPLE):
        raise ValueError(f"--size={size[0]}x{size[1]}: height and width must be multiples of {SIZE_MULTIPLE}")
    dataset = data.make_dataset(data_dir, split, batch_size=config.batch_size, image_size=size, seed=config.seed)
    log(f"training a segmenter ({space.name}, {space.num_classes} classes) on {data_dir} split {split}")
    model = train_segmenter(config, dataset, log=log)
    path = export_segmenter(model, export_dir, space, config)
    log(f"wrote {path} (serving_default: images uint8 [N, H, W, 3] -> logits [N, H, W, {space.num_classes}])")
    log(json.dumps(dataclasses.asdict(config)))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from crn_tf.config import parse_size

    parser = argparse.ArgumentParser(description="Trains the small segmenter on a converted split and exports it.")
    parser.add_argument("--data_dir", required=True, help="converted data (crn-convert): shards + {split}.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--export_dir", required=True, help="SavedModel directory to write (replaced atomically)")
    parser.add_argument("--size", default=None, help="training size HxW (default: the data's own size)")
    defaults = SegmenterConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--widths", default=",".join(map(str, defaults.widths)))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError as e:
        raise SystemExit(f"--widths={args.widths!r}: expected 3 comma-separated integers") from e
    config = SegmenterConfig(defaults.num_classes, widths, args.steps, args.batch_size, args.learning_rate, args.seed)
    try:
        train_and_export(args.data_dir, args.split, args.export_dir, parse_size(args.size, "--size"), config)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
