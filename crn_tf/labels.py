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

    def to_dict(self) -> dict:
        """`{"name": ..., "classes": [{"name": ..., "color": [r, g, b]}, ...]}` (the palette JSON format)."""
        return {
            "name": self.name,
            "classes": [{"name": n, "color": list(c)} for n, c in zip(self.class_names, self.palette)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d, source: str = "<label space>") -> LabelSpace:
        """Builds a label space from the dict of `to_dict`; a malformed one raises ValueError naming `source`."""
        try:
            if not isinstance(d, dict) or not isinstance(d.get("classes"), list):
                raise TypeError(f"got {type(d).__name__}{' without a list of classes' if isinstance(d, dict) else ''}")
            names = [c["name"] for c in d["classes"]]
            if not all(isinstance(n, str) for n in names):
                raise TypeError("class names must be strings")
            return cls(name=str(d.get("name", "custom")), class_names=names, palette=[c["color"] for c in d["classes"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{source}: not a palette JSON / label space ({e}); expected "
                '{"name": ..., "classes": [{"name": "road", "color": [128, 64, 128]}, ...]}'
            ) from e

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> LabelSpace:
        """Builds a label space from `{"name": ..., "classes": [{"name": ..., "color": [r, g, b]}, ...]}`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a palette JSON ({e})") from e
        return cls.from_dict(d, source)


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


# ADE20K SceneParsing (ADEChallengeData2016, the 150 classes of the MIT Scene Parsing Benchmark):
# names from objectInfo150.txt and colours from visualizationCode/color150.mat of
# github.com/CSAILVision/sceneparsing (commit e20222964c58eba41d8986d45d652d93adc234a5), in class
# order. Annotation value v (1..150) is class v - 1 here; 0 ("other objects") is void.
_ADE20K_NAMES = """\
wall
building, edifice
sky
floor, flooring
tree
ceiling
road, route
bed
windowpane, window
grass
cabinet
sidewalk, pavement
person, individual, someone, somebody, mortal, soul
earth, ground
door, double door
table
mountain, mount
plant, flora, plant life
curtain, drape, drapery, mantle, pall
chair
car, auto, automobile, machine, motorcar
water
painting, picture
sofa, couch, lounge
shelf
house
sea
mirror
rug, carpet, carpeting
field
armchair
seat
fence, fencing
desk
rock, stone
wardrobe, closet, press
lamp
bathtub, bathing tub, bath, tub
railing, rail
cushion
base, pedestal, stand
box
column, pillar
signboard, sign
chest of drawers, chest, bureau, dresser
counter
sand
sink
skyscraper
fireplace, hearth, open fireplace
refrigerator, icebox
grandstand, covered stand
path
stairs, steps
runway
case, display case, showcase, vitrine
pool table, billiard table, snooker table
pillow
screen door, screen
stairway, staircase
river
bridge, span
bookcase
blind, screen
coffee table, cocktail table
toilet, can, commode, crapper, pot, potty, stool, throne
flower
book
hill
bench
countertop
stove, kitchen stove, range, kitchen range, cooking stove
palm, palm tree
kitchen island
computer, computing machine, computing device, data processor, electronic computer, information processing system
swivel chair
boat
bar
arcade machine
hovel, hut, hutch, shack, shanty
bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle
towel
light, light source
truck, motortruck
tower
chandelier, pendant, pendent
awning, sunshade, sunblind
streetlight, street lamp
booth, cubicle, stall, kiosk
television, television receiver, television set, tv, tv set, idiot box, boob tube, telly, goggle box
airplane, aeroplane, plane
dirt track
apparel, wearing apparel, dress, clothes
pole
land, ground, soil
bannister, banister, balustrade, balusters, handrail
escalator, moving staircase, moving stairway
ottoman, pouf, pouffe, puff, hassock
bottle
buffet, counter, sideboard
poster, posting, placard, notice, bill, card
stage
van
ship
fountain
conveyer belt, conveyor belt, conveyer, conveyor, transporter
canopy
washer, automatic washer, washing machine
plaything, toy
swimming pool, swimming bath, natatorium
stool
barrel, cask
basket, handbasket
waterfall, falls
tent, collapsible shelter
bag
minibike, motorbike
cradle
oven
ball
food, solid food
step, stair
tank, storage tank
trade name, brand name, brand, marque
microwave, microwave oven
pot, flowerpot
animal, animate being, beast, brute, creature, fauna
bicycle, bike, wheel, cycle
lake
dishwasher, dish washer, dishwashing machine
screen, silver screen, projection screen
blanket, cover
sculpture
hood, exhaust hood
sconce
vase
traffic light, traffic signal, stoplight
tray
ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin
fan
pier, wharf, wharfage, dock
crt screen
plate
monitor, monitoring device
bulletin board, notice board
shower
radiator
glass, drinking glass
clock
flag\
"""
_ADE20K_COLOURS = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip
# color150.mat gives road (6) and skyscraper (48) the same colour (140, 140, 140); colour layouts need
# one colour per class, so skyscraper gets (140, 140, 160), a colour no other class has.
ADE20K_DUPLICATE_COLOUR_FIX = {48: (140, 140, 160)}

# COCO-Stuff 164k: names from labels.txt of github.com/nightrome/cocostuff (ids 1..182 there; the
# stuffthingmaps PNGs store id - 1, i.e. 0..181, and 255 = unlabeled). 11 thing classes have no
# annotations in COCO (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door,
# blender, hair brush) but keep their ids, as in the PNGs. COCO-Stuff publishes no colour per class
# (its API's getCMap paints every thing class black), so the colours are the PASCAL VOC colour map
# that DeepLab uses for datasets without their own (see pascal_palette).
_COCOSTUFF_NAMES = """\
person
bicycle
car
motorcycle
airplane
bus
train
truck
boat
traffic light
fire hydrant
street sign
stop sign
parking meter
bench
bird
cat
dog
horse
sheep
cow
elephant
bear
zebra
giraffe
hat
backpack
umbrella
shoe
eye glasses
handbag
tie
suitcase
frisbee
skis
snowboard
sports ball
kite
baseball bat
baseball glove
skateboard
surfboard
tennis racket
bottle
plate
wine glass
cup
fork
knife
spoon
bowl
banana
apple
sandwich
orange
broccoli
carrot
hot dog
pizza
donut
cake
chair
couch
potted plant
bed
mirror
dining table
window
desk
toilet
door
tv
laptop
mouse
remote
keyboard
cell phone
microwave
oven
toaster
sink
refrigerator
blender
book
clock
vase
scissors
teddy bear
hair drier
toothbrush
hair brush
banner
blanket
branch
bridge
building-other
bush
cabinet
cage
cardboard
carpet
ceiling-other
ceiling-tile
cloth
clothes
clouds
counter
cupboard
curtain
desk-stuff
dirt
door-stuff
fence
floor-marble
floor-other
floor-stone
floor-tile
floor-wood
flower
fog
food-other
fruit
furniture-other
grass
gravel
ground-other
hill
house
leaves
light
mat
metal
mirror-stuff
moss
mountain
mud
napkin
net
paper
pavement
pillow
plant-other
plastic
platform
playingfield
railing
railroad
river
road
rock
roof
rug
salad
sand
sea
shelf
sky-other
skyscraper
snow
solid-other
stairs
stone
straw
structural-other
table
tent
textile-other
towel
tree
vegetable
wall-brick
wall-concrete
wall-other
wall-panel
wall-stone
wall-tile
wall-wood
water-other
waterdrops
window-blind
window-other
wood\
"""


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
ADE20K = LabelSpace(
    "ade20k",
    _ADE20K_NAMES.splitlines(),
    [ADE20K_DUPLICATE_COLOUR_FIX.get(i, c) for i, c in enumerate(_ADE20K_COLOURS)],
)
COCOSTUFF = LabelSpace("cocostuff", _COCOSTUFF_NAMES.splitlines(), pascal_palette(182))

LABEL_SPACES: dict[str, LabelSpace] = {s.name: s for s in (CITYSCAPES, GTA5, NYU40, ADE20K, COCOSTUFF)}


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
