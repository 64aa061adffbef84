"""ADE20K SceneParsing (the MIT Scene Parsing Benchmark, `ADEChallengeData2016`) in its official layout.

    {root}/images/training/ADE_train_00000001.jpg        photos (validation/: ADE_val_*.jpg)
    {root}/annotations/training/ADE_train_00000001.png   8-bit class ids: 0 = other, 1..150 = the classes

Download `ADEChallengeData2016.zip` from the benchmark's page (http://sceneparsing.csail.mit.edu/)
and unzip it; `--input` is the `ADEChallengeData2016` folder. Annotation value v in 1..150 becomes
train id v - 1 of the `ade20k` label space (objectInfo150 order); 0 ("other objects") becomes void.
Any other value stops the conversion with the file named.
"""

from __future__ import annotations

import numpy as np

from crn_tf import labels
from data_tools.common import (
    PHOTO_EXTENSIONS,
    ConversionError,
    Item,
    LoadedPair,
    PairSource,
    decode_label_ids,
    decode_photo,
    list_files,
    map_label_values,
    match_by_stem,
    read_bytes,
)

# --split names -> the release's folder names.
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

# Annotation value -> train id: 0 (other) -> void, v -> v - 1; values above 150 are not in the release.
VALUE_TO_TRAIN_ID = np.full(256, -1, np.int16)
VALUE_TO_TRAIN_ID[0] = labels.VOID_ID
VALUE_TO_TRAIN_ID[1:151] = np.arange(150)


def make_source(root: str, split: str = "train") -> PairSource:
    """Lists the pairs of `split` ("train"/"training" or "val"/"validation") under an ADEChallengeData2016 root."""
    if split not in SPLITS:
        raise ValueError(f"--split={split!r}: ADE20K has {sorted(set(SPLITS))}")
    root = root.rstrip("/")
    photo_dir, label_dir = f"{root}/images/{SPLITS[split]}", f"{root}/annotations/{SPLITS[split]}"
    photos = list_files(photo_dir, PHOTO_EXTENSIONS)
    label_files = list_files(label_dir, (".png",))
    if not photos and not label_files:
        raise ConversionError(
            photo_dir, f"no photos or annotations found; expected the official layout images/{SPLITS[split]}/*.jpg "
            f"and annotations/{SPLITS[split]}/*.png of ADEChallengeData2016"
        )  # fmt: skip
    pairs, problems = match_by_stem(photos, label_files, photo_dir, label_dir)

    def load(item: Item) -> LoadedPair:
        pair = decode_photo(read_bytes(item.photo), item.photo)
        values = decode_label_ids(read_bytes(item.label), item.label)
        pair.label_ids = map_label_values(values, VALUE_TO_TRAIN_ID, item.label, "ADE20K annotation values 0..150")
        return pair

    info = {"input": root, "label_mapping": "annotation 0 (other) -> void, 1..150 -> train ids 0..149"}
    return PairSource("ade20k", labels.ADE20K, [Item(s, p, lab) for s, p, lab in pairs], load, info, problems)
