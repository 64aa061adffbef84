"""GTA5 "Playing for Data" (Richter et al. 2016): `{root}/images/*.png` + `{root}/labels/*.png`.

The labels are palette PNGs whose colours are the Cityscapes colours; they are matched against
the 19 train-class colours (like Cityscapes' colour route: other classes -> void). Some frames
of the release have a label whose size differs from the photo: those stop the conversion with a
message naming the file, or are listed in the manifest with --skip_bad.
"""

from __future__ import annotations

from crn_tf import labels
from data_tools import folder
from data_tools.common import PairSource


def make_source(root: str) -> PairSource:
    """Lists the GTA5 pairs under `root` (holding images/ and labels/)."""
    source = folder.make_source(root, label_format="colors", label_space=labels.GTA5, dataset="gta")
    source.info["label_mapping"] = "palette colours -> Cityscapes trainIds (unknown colours -> void)"
    return source
