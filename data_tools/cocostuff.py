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
    photos = list_files(photo_dir, PHOTO_EXTENSIONS)
    label_files = list_files(label_dir, (".png",))
    if not photos and not label_files:
        raise ConversionError(
            photo_dir, f"no photos or stuff+thing maps found; expected the official layout {folder}/*.jpg and "
            f"{MAPS_DIR}/{folder}/*.png"
        )  # fmt: skip
    pairs, problems = match_by_stem(photos, label_files, photo_dir, label_dir)

    def load(item: Item) -> LoadedPair:
        pair = decode_photo(read_bytes(item.photo), item.photo)
        values = decode_label_ids(read_bytes(item.label), item.label)
        pair.label_ids = map_label_values(values, VALUE_TO_TRAIN_ID, item.label, "COCO-Stuff ids 0..181 and 255")
        return pair

    info = {"input": root, "label_mapping": "stuffthingmaps ids 0..181 = train ids, 255 (unlabeled) -> void"}
    return PairSource("cocostuff", labels.COCOSTUFF, [Item(s, p, lab) for s, p, lab in pairs], load, info, problems)
