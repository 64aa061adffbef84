"""Cityscapes in its official layout.

    {root}/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png   photos
    {root}/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png    labels (route "labelIds")
    {root}/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_color.png       labels (route "color")

Route "labelIds" maps the official labelIds to the 19 trainIds with cityscapesScripts' table
(licence plate and polegroup -> void). Route "color" matches the colours of `_color.png` (RGBA)
against the 19 train-class colours, as the authors' CRN did: pixels of classes that share a train
class's colour count as that class (licence plate -> car, polegroup -> pole), others are void.
"""

from __future__ import annotations

from crn_tf import labels
from data_tools.common import (
    ConversionError,
    Item,
    LoadedPair,
    PairSource,
    decode_label_colors,
    decode_label_ids,
    decode_photo,
    read_bytes,
)

ROUTES = {
    "labelIds": "labelIds -> trainIds (cityscapesScripts table; licence plate and polegroup -> void)",
    "color": "_color.png colours -> trainIds (licence plate -> car, polegroup -> pole, other classes -> void)",
}
_SUFFIX = {"labelIds": "_gtFine_labelIds.png", "color": "_gtFine_color.png"}
PHOTO_SUFFIX = "_leftImg8bit.png"


def _by_key(root: str, kind: str, split: str, suffix: str) -> dict[str, str]:
    """{"{split}/{city}/{stem}": path} of `{root}/{kind}/{split}/*/*{suffix}`, listed folder by folder
    (not globbed: the paths may hold `[ ] * ?`)."""
    import tensorflow as tf

    found = {}
    top = f"{root}/{kind}/{split}"
    if not tf.io.gfile.isdir(top):
        return found
    for city in sorted(c.rstrip("/") for c in tf.io.gfile.listdir(top)):
        if not tf.io.gfile.isdir(f"{top}/{city}"):
            continue
        for name in tf.io.gfile.listdir(f"{top}/{city}"):
            if name.endswith(suffix):
                found[f"{split}/{city}/{name[: -len(suffix)]}"] = f"{top}/{city}/{name}"
    return found


def make_source(root: str, split: str, label_route: str = "labelIds") -> PairSource:
    """Lists the pairs of `split` under a Cityscapes root.

    Args:
        root: folder holding leftImg8bit/ and gtFine/.
        split: "train", "val", "test" (or any folder name under leftImg8bit/).
        label_route: "labelIds" or "color" (see the module docstring).
    """
    if label_route not in ROUTES:
        raise ValueError(f"--label_route={label_route!r}: expected one of {sorted(ROUTES)}")
    root = root.rstrip("/")
    suffix = _SUFFIX[label_route]
    photos = _by_key(root, "leftImg8bit", split, PHOTO_SUFFIX)
    label_files = _by_key(root, "gtFine", split, suffix)
    if not photos and not label_files:
        raise ConversionError(
            f"{root}/leftImg8bit/{split}", f"no photos (*{PHOTO_SUFFIX}) or labels (*{suffix}) found; expected the "
            f"official layout leftImg8bit/{split}/<city>/*{PHOTO_SUFFIX} and gtFine/{split}/<city>/*{suffix}"
        )  # fmt: skip
    problems = [
        ConversionError(photos[k], f"photo without label: expected {root}/gtFine/{k}{suffix}")
        for k in sorted(set(photos) - set(label_files))
    ] + [
        ConversionError(label_files[k], f"label without photo: expected {root}/leftImg8bit/{k}{PHOTO_SUFFIX}")
        for k in sorted(set(label_files) - set(photos))
    ]
    items = [Item(k.rsplit("/", 1)[-1], photos[k], label_files[k]) for k in sorted(set(photos) & set(label_files))]

    def load(item: Item) -> LoadedPair:
        pair = decode_photo(read_bytes(item.photo), item.photo)
        label_bytes = read_bytes(item.label)
        if label_route == "labelIds":
            pair.label_ids = labels.remap_ids(
                decode_label_ids(label_bytes, item.label), labels.CITYSCAPES_LABELID_TO_TRAINID
            )
        else:
            pair.label_ids = decode_label_colors(label_bytes, item.label, labels.CITYSCAPES)
        return pair

    info = {"input": root, "label_route": label_route, "label_mapping": ROUTES[label_route]}
    return PairSource("cityscapes", labels.CITYSCAPES, items, load, info, problems)
