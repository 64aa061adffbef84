"""Any pair of folders `{root}/images/` + `{root}/labels/`, matched by file stem.

Photos: PNG or JPEG. Labels: single-channel 8-bit PNGs of train ids ("ids"; 255 = void, other
values beyond the label space are refused with the file named) or colour layouts ("colors":
RGB/RGBA/palette PNGs matched against the label space's palette, a built-in name or a palette JSON
`{"name": ..., "classes": [{"name": "road", "color": [128, 64, 128]}, ...]}`).
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
    paired_files,
    read_bytes,
)

LABEL_FORMATS = ("ids", "colors")


def make_source(
    root: str,
    label_format: str = "ids",
    label_space: labels.LabelSpace | str = "cityscapes",
    images: str = "images",
    labels_dir: str = "labels",
    dataset: str = "folder",
) -> PairSource:
    """Lists the pairs under `root`.

    Args:
        root: folder holding the photo and label folders.
        label_format: "ids" or "colors".
        label_space: a LabelSpace, a built-in name or a palette JSON path.
        images, labels_dir: the two sub-folder names.
        dataset: name recorded in the manifest.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"--label_format={label_format!r}: expected one of {LABEL_FORMATS}")
    space = label_space if isinstance(label_space, labels.LabelSpace) else labels.get_label_space(label_space)
    root = root.rstrip("/")
    photo_dir, label_dir = f"{root}/{images}", f"{root}/{labels_dir}"
    pairs, problems = paired_files(
        photo_dir,
        label_dir,
        ConversionError(root, f"empty input: no PNG/JPEG photos in {photo_dir}, no PNG labels in {label_dir}"),
    )

    def load(item: Item) -> LoadedPair:
        pair = decode_photo(read_bytes(item.photo), item.photo)
        label_bytes = read_bytes(item.label)
        if label_format == "ids":
            pair.label_ids = decode_label_ids(label_bytes, item.label)
        else:
            pair.label_ids = decode_label_colors(label_bytes, item.label, space)
        return pair

    info = {"input": root, "label_format": label_format}
    return PairSource(dataset, space, [Item(s, p, lab) for s, p, lab in pairs], load, info, problems)
