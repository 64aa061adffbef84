"""COCO-Stuff 164k (Caesar et al., CVPR 2018) in its official layout: COCO 2017 photos + stuffthingmaps.

    {root}/train2017/000000000009.jpg                            photos (val2017/ likewise)
    {root}/stuffthingmaps_trainval2017/train2017/000000000009.png  8-bit ids 0..181, 255 = unlabeled

Download `train2017.zip` / `val2017.zip` (cocodataset.org) and `stuffthingmaps_trainval2017.zip`
(linked from github.com/nightrome/cocostuff) and unzip them into one folder, the maps into
`stuffthingmaps_trainval2017/`. The PNG ids are the train ids of the `cocostuff` label space (182
classes: labels.txt id - 1, including the 11 thing classes COCO never annotated); 255 is void. Any
other value stops the conversion with the file named.
"""

from __future__ import annotations

import numpy as np

from crn_tf import labels
from data_tools.common import PairSource, id_map_source

MAPS_DIR = "stuffthingmaps_trainval2017"

VALUE_TO_TRAIN_ID = np.full(256, -1, np.int16)
VALUE_TO_TRAIN_ID[:182] = np.arange(182)
VALUE_TO_TRAIN_ID[255] = labels.VOID_ID


def make_source(root: str, split: str = "train") -> PairSource:
    """Lists the pairs of `split` ("train"/"train2017" or "val"/"val2017") under a COCO-Stuff root."""
    folder = split if split.endswith("2017") else f"{split}2017"
    if folder not in ("train2017", "val2017"):
        raise ValueError(f"--split={split!r}: COCO-Stuff 164k has train (train2017) and val (val2017)")
    root = root.rstrip("/")
    photo_dir, label_dir = f"{root}/{folder}", f"{root}/{MAPS_DIR}/{folder}"
    return id_map_source(
        "cocostuff",
        labels.COCOSTUFF,
        photo_dir,
        label_dir,
        VALUE_TO_TRAIN_ID,
        "COCO-Stuff ids 0..181 and 255",
        {"input": root, "label_mapping": "stuffthingmaps ids 0..181 = train ids, 255 (unlabeled) -> void"},
        f"the official layout {folder}/*.jpg and {MAPS_DIR}/{folder}/*.png",
    )
