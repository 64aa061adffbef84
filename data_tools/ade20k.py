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
from data_tools.common import PairSource, id_map_source

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
    return id_map_source(
        "ade20k",
        labels.ADE20K,
        photo_dir,
        label_dir,
        VALUE_TO_TRAIN_ID,
        "ADE20K annotation values 0..150",
        {"input": root, "label_mapping": "annotation 0 (other) -> void, 1..150 -> train ids 0..149"},
        f"the official layout images/{SPLITS[split]}/*.jpg and annotations/{SPLITS[split]}/*.png of "
        "ADEChallengeData2016",
    )
