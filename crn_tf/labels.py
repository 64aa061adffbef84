"""Label spaces: class names, colour palettes, id maps, colour <-> id, one-hot with the void channel.

Conventions used everywhere in crn_tf:
- A *label id image* is uint8 [H, W] of train ids 0..num_classes-1; any other value (255 by
  convention) is void.
- A *colour layout* is uint8 [H, W, 3] in the label space's palette; colours that are not in the
  palette (black included) are void.
- The network input is float one-hot [.., H, W, num_classes + 1], void channel last
  (original code: void = 1 - sum of the class channels).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

VOID_ID = 255
VOID_COLOR = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """A set of semantic classes with a colour per class.

    Attributes:
        name: identifier stored in TFRecord manifests and model configs.
        class_names: one name per train id.
        palette: one RGB colour per train id; colours must be distinct.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))
        if len(self.class_names) != len(self.palette):
            raise ValueError(
                f"label space {self.name!r}: {len(self.class_names)} class names but {len(self.palette)} colours"
            )
        if not 1 <= len(self.palette) < VOID_ID:
            raise ValueError(f"label space {self.name!r}: needs 1..{VOID_ID - 1} classes, got {len(self.palette)}")
        for name, colour in zip(self.class_names, self.palette):
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise ValueError(f"label space {self.name!r}: class {name!r} has colour {colour}, expected RGB 0..255")
        if len(set(self.palette)) != len(self.palette):
            raise ValueError(f"label space {self.name!r}: two classes share a colour")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def color_table(self) -> np.ndarray:
        """uint8 [256, 3]: colour of each id, VOID_COLOR for ids outside the space."""
        table = np.tile(np.array(VOID_COLOR, np.uint8), (256, 1))
        table[: self.num_classes] = np.array(self.palette, np.uint8)
        return table

    def to_json(self) -> str:
        classes = [{"name": n, "color": list(c)} for n, c in zip(self.class_names, self.palette)]
        return json.dumps({"name": self.name, "classes": classes}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> LabelSpace:
        """Builds a label space from `{"name": ..., "classes": [{"name": ..., "color": [r, g, b]}, ...]}`."""
        try:
            d = json.loads(text)
            classes = d["classes"]
            return cls(
                name=d.get("name", "custom"),
                class_names=[c["name"] for c in classes],
                palette=[tuple(c["color"]) for c in classes],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{source}: not a palette JSON ({e!r}); expected "
                '{"name": ..., "classes": [{"name": "road", "color": [128, 64, 128]}, ...]}'
            ) from e


# The 19 Cityscapes train classes, in train-id order, with their official colours.
_CITYSCAPES_CLASSES = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)

# Official cityscapesScripts labels.py: labelId -> trainId (255 = ignored in evaluation).
# labelId -1 (license plate) is not stored in *_labelIds.png files.
CITYSCAPES_LABELID_TO_TRAINID = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255,  # unlabeled .. ground
    7: 0, 8: 1, 9: 255, 10: 255,  # road, sidewalk, parking, rail track
    11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255,  # building, wall, fence, guard rail, bridge, tunnel
    17: 5, 18: 255, 19: 6, 20: 7,  # pole, polegroup, traffic light, traffic sign
    21: 8, 22: 9, 23: 10, 24: 11, 25: 12,  # vegetation, terrain, sky, person, rider
    26: 13, 27: 14, 28: 15, 29: 255, 30: 255,  # car, truck, bus, caravan, trailer
    31: 16, 32: 17, 33: 18,  # train, motorcycle, bicycle
}  # fmt: skip

# NYUv2 40-class set of Gupta et al. (CVPR 2013), ids 1..40 in the released mapping; train id = id - 1.
_NYU40_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip


def pascal_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved ids), skipping index 0 (black = void)."""
    colours = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


CITYSCAPES = LabelSpace("cityscapes", [n for n, _ in _CITYSCAPES_CLASSES], [c for _, c in _CITYSCAPES_CLASSES])
# GTA5 ("Playing for Data") is labelled with the Cityscapes classes and colours.
GTA5 = dataclasses.replace(CITYSCAPES, name="gta5")
NYU40 = LabelSpace("nyu40", _NYU40_NAMES, pascal_palette(len(_NYU40_NAMES)))

LABEL_SPACES: dict[str, LabelSpace] = {s.name: s for s in (CITYSCAPES, GTA5, NYU40)}


def get_label_space(name_or_path: str) -> LabelSpace:
    """A built-in label space by name, or one read from a palette JSON file (any tf.io.gfile path)."""
    if name_or_path in LABEL_SPACES:
        return LABEL_SPACES[name_or_path]
    import tensorflow as tf  # deferred: config summaries need no TensorFlow

    if not tf.io.gfile.exists(name_or_path):
        raise ValueError(
            f"label space {name_or_path!r} is neither a built-in ({sorted(LABEL_SPACES)}) nor an existing palette JSON"
        )
    with tf.io.gfile.GFile(name_or_path, "r") as f:
        return LabelSpace.from_json(f.read(), source=name_or_path)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colors_to_ids(rgb: np.ndarray, space: LabelSpace) -> np.ndarray:
    """Colour layout uint8 [H, W, 3] -> train ids uint8 [H, W]; unknown colours -> VOID_ID."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"colour layout must be [H, W, 3], got shape {rgb.shape}")
    keys = _pack(np.array(space.palette, np.uint8))
    order = np.argsort(keys)
    sorted_keys = keys[order]
    packed = _pack(rgb)
    pos = np.clip(np.searchsorted(sorted_keys, packed), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == packed
    return np.where(found, order[pos], VOID_ID).astype(np.uint8)


def ids_to_colors(ids: np.ndarray, space: LabelSpace) -> np.ndarray:
    """Train ids [H, W] -> colour layout uint8 [H, W, 3]; ids outside the space -> VOID_COLOR."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "ui":
        raise ValueError(f"label ids must be integers, got dtype {ids.dtype}")
    ids = np.where((ids < 0) | (ids > 255), VOID_ID, ids).astype(np.uint8)
    return space.color_table()[ids]


def remap_ids(ids: np.ndarray, mapping: dict[int, int], default: int = VOID_ID) -> np.ndarray:
    """Maps ids through `mapping` (e.g. CITYSCAPES_LABELID_TO_TRAINID); unmapped ids -> `default`."""
    table = np.full(256, default, np.uint8)
    for src, dst in mapping.items():
        if 0 <= src < 256:
            table[src] = dst
    ids = np.asarray(ids)
    if ids.dtype != np.uint8:
        raise ValueError(f"label id image must be uint8 for remapping, got {ids.dtype}")
    return table[ids]


def decode_label_image(data: bytes, space: LabelSpace, source: str = "<bytes>") -> np.ndarray:
    """Decodes PNG/JPEG bytes of a layout into train ids uint8 [H, W].

    Accepts single-channel 8-bit id images (mode 'L': the values are train ids), palette-mode PNGs
    (their colours are matched against the space's palette, as the GTA5 release stores them) and
    RGB / RGBA colour layouts (alpha ignored, as in Cityscapes' _color.png). 16-bit and float
    images are refused.
    """
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for corrupt files
        raise ValueError(f"{source}: not a readable image ({e})") from e
    if image.mode == "L":
        return np.asarray(image, np.uint8)
    if image.mode in ("I;16", "I;16B", "I", "F"):
        raise ValueError(f"{source}: {image.mode} label image; expected 8-bit ids (mode L) or colours (RGB/P)")
    return colors_to_ids(np.asarray(image.convert("RGB")), space)


def read_label_image(path: str, space: LabelSpace) -> np.ndarray:
    """Reads a layout file (any tf.io.gfile path) into train ids uint8 [H, W]; see decode_label_image."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        return decode_label_image(f.read(), space, source=path)


def one_hot(ids, num_classes: int, dtype="float32"):
    """Train ids [..., H, W] (any int dtype) -> one-hot [..., H, W, num_classes + 1], void last.

    Ids outside 0..num_classes-1 are void. Works eagerly and inside tf.function / Dataset.map.
    """
    import tensorflow as tf

    classes = tf.one_hot(tf.cast(ids, tf.int32), num_classes, dtype=dtype)  # out of range -> all zero
    void = 1 - tf.reduce_sum(classes, axis=-1, keepdims=True)
    return tf.concat([classes, void], axis=-1)
