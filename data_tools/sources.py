"""The pair source of each dataset crn-convert knows, from one set of options (crn-convert's flags)."""

from __future__ import annotations

import dataclasses

from crn_tf.config import parse_size
from data_tools import ade20k, cityscapes, cocostuff, common, folder, gta, nyu, synthetic

DATASETS = ("cityscapes", "gta", "nyu", "ade20k", "cocostuff", "folder", "synthetic")


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Where a dataset is and how to read it (each field is the crn-convert flag of the same name).

    Attributes:
        input: the dataset's root folder (nyu: the .mat file; synthetic: where scenes are generated).
        split: the split (Cityscapes, ADE20K, COCO-Stuff: the folder it names; synthetic: the one generated).
        label_route: cityscapes: `labelIds` or `color`.
        label_format, label_space: folder: labels as `ids` or `colors`, and their label space.
        nyu_mapping, nyu_indices: nyu: the 894/895 -> 40 class mapping, and the 1-based frames of the split.
        count, size, seed: synthetic: how many scenes, their HxW, and their seed.
    """

    input: str
    split: str = "train"
    label_route: str = "labelIds"
    label_format: str = "ids"
    label_space: str = "cityscapes"
    nyu_mapping: str | None = None
    nyu_indices: str | None = None
    count: int = 64
    size: str = "128x256"
    seed: int = 0


def make_source(dataset: str, o: SourceOptions) -> common.PairSource:
    """The pairs of `dataset` (one of DATASETS); synthetic scenes are generated first.

    Raises:
        ValueError: an unknown dataset or a missing option, naming it.
    """
    if dataset == "cityscapes":
        return cityscapes.make_source(o.input, o.split, o.label_route)
    if dataset == "gta":
        return gta.make_source(o.input)
    if dataset == "ade20k":
        return ade20k.make_source(o.input, o.split)
    if dataset == "cocostuff":
        return cocostuff.make_source(o.input, o.split)
    if dataset == "folder":
        return folder.make_source(o.input, o.label_format, o.label_space)
    if dataset == "nyu":
        if not o.nyu_mapping:
            raise ValueError("nyu needs --nyu_mapping (classMapping40.mat of Gupta et al., or .npy/.json)")
        indices = None if not o.nyu_indices else [i - 1 for i in nyu.load_indices(o.nyu_indices)]
        return nyu.make_source(o.input, o.nyu_mapping, indices)
    if dataset != "synthetic":
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    h, w = parse_size(o.size, "--size")
    synthetic.generate(o.input, o.split, o.count, h, w, o.seed)
    return cityscapes.make_source(o.input, o.split, o.label_route)
