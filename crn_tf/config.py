"""Model configuration: `CRNConfig` and the named presets of the paper and the original release.

Every number the paper or the authors' code fixes lives here, once:

    python -m crn_tf.config --preset cityscapes_1024p --summary   # ~1 s, no TensorFlow needed

prints the cascade (module sizes, widths, parameters per module) and the total parameter count.
Variants are made with `dataclasses.replace(get_preset("cityscapes_256p"), num_outputs=1)` or
`get_preset("tiny", widths=(8, 8))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from crn_tf import labels

UPSAMPLING_MODES = ("align_corners", "half_pixel")
NORMALIZATIONS = ("layer", "none")

# Paper Sec. 3.2: LReLU slope; original code: lrelu(x) = max(0.2 x, x).
LEAKY_RELU_SLOPE = 0.2
# Original code: slim.layer_norm's epsilon.
LAYER_NORM_EPSILON = 1e-12

# The perceptual loss layers (paper Sec. 3.3): the image itself, then VGG-19 conv{1..5}_2.
LOSS_LAYERS = ("image", "block1_conv2", "block2_conv2", "block3_conv2", "block4_conv2", "block5_conv2")

# Fixed layer weights of the released models (original code; "the inverse of each term's mean at
# epoch 100"), in LOSS_LAYERS order.
LAYER_WEIGHTS_256P = (1.0, 1 / 1.6, 1 / 2.3, 1 / 1.8, 1 / 2.8, 10 / 0.8)
LAYER_WEIGHTS_512P = (1.0, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5)  # also 1024p
LAYER_WEIGHTS_GTA_256P = (1.0, 1 / 1.4, 1 / 1.8, 1 / 1.3, 1 / 2.2, 10 / 0.62)

# Diversity loss (eq. 3) as the original mixes it: 0.999 * sum_p min_u + 0.001 * sum_p mean_u.
DIVERSITY_MIN_WEIGHT = 0.999
DIVERSITY_MEAN_WEIGHT = 0.001

# A model_dir: its config file and its checkpoints' prefix (`ckpt-<step>`); crn_tf/model_dir.py
# reads and writes them with TensorFlow, crn_tf/api.py reads them without.
CONFIG_FILENAME = "crn_config.json"
CHECKPOINT_PREFIX = "ckpt"


def paper_widths(num_modules: int) -> tuple[int, ...]:
    """Feature widths d_i of the paper for a cascade starting at height 4 (Sec. 3.2).

    1024 for module heights < 128, 512 for 128 and 256, 128 for 512, 32 for 1024.
    """
    by_height = {128: 512, 256: 512, 512: 128, 1024: 32}
    return tuple(by_height.get(4 * 2**i, 1024) for i in range(num_modules))


@dataclasses.dataclass(frozen=True)
class CRNConfig:
    """Everything that fixes a CRN generator's architecture (and its preset's loss weights).

    Attributes:
        name: preset name, for logs and exported metadata.
        label_space: the label space's name: a built-in one (see `crn_tf.labels.LABEL_SPACES`), the
            name of the space in `classes`, or (older configs) the path of a palette JSON.
        num_classes: semantic classes without void; the network sees num_classes + 1 channels.
        widths: feature maps d_i of each refinement module, coarsest first.
        base_height, base_width: resolution of the first module at the native size.
        num_outputs: k, the number of images synthesized at once (Sec. 3.4); 1 = single image.
        upsampling: bilinear upsampling between modules, `align_corners` (the original code, needed
            for its checkpoints) or `half_pixel` (TF2's default convention).
        normalization: `layer` (the paper) or `none` (for ablations and locality tests).
        layer_weights: fixed perceptual-loss weights in LOSS_LAYERS order, or None for the
            paper's automatic weights (1/number-of-elements, rebalanced once during training).
        diversity: for num_outputs > 1, `class` (eq. 3, the original) or `image` (eq. 2).
        classes: the full label space, ((name, (r, g, b)), ...) in train-id order, as training
            recorded it from the data (`with_label_space`), so that a model needs no file beside it
            to know its classes and colours; None = the built-in space named by `label_space`.
    """

    name: str = "custom"
    label_space: str = "cityscapes"
    num_classes: int = 19
    widths: tuple[int, ...] = paper_widths(7)
    base_height: int = 4
    base_width: int = 8
    num_outputs: int = 1
    upsampling: str = "align_corners"
    normalization: str = "layer"
    layer_weights: tuple[float, ...] | None = LAYER_WEIGHTS_256P
    diversity: str = "class"
    classes: tuple[tuple[str, tuple[int, int, int]], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.layer_weights is not None:
            object.__setattr__(self, "layer_weights", tuple(float(w) for w in self.layer_weights))
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"CRNConfig.widths must be a non-empty list of positive ints, got {self.widths}")
        for field in ("num_classes", "base_height", "base_width", "num_outputs"):
            if getattr(self, field) < 1:
                raise ValueError(f"CRNConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"CRNConfig.upsampling must be one of {UPSAMPLING_MODES}, got {self.upsampling!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"CRNConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.diversity not in ("class", "image"):
            raise ValueError(f"CRNConfig.diversity must be 'class' or 'image', got {self.diversity!r}")
        if self.layer_weights is not None and len(self.layer_weights) != len(LOSS_LAYERS):
            raise ValueError(
                f"CRNConfig.layer_weights needs {len(LOSS_LAYERS)} values ({', '.join(LOSS_LAYERS)}), "
                f"got {len(self.layer_weights)}"
            )
        if self.classes is not None:
            classes = [(c["name"], c["color"]) if isinstance(c, dict) else c for c in self.classes]
            try:
                space = labels.LabelSpace(self.label_space, [n for n, _ in classes], [c for _, c in classes])
            except (TypeError, ValueError) as e:
                raise ValueError(f"CRNConfig.classes: not a valid label space ({e})") from e
            object.__setattr__(self, "classes", tuple(zip(space.class_names, space.palette)))
            if self.num_classes != space.num_classes:
                raise ValueError(
                    f"CRNConfig.num_classes={self.num_classes} disagrees with its classes, which list "
                    f"{space.num_classes} ({self.label_space!r})"
                )
        elif self.label_space in labels.LABEL_SPACES:
            expected = labels.LABEL_SPACES[self.label_space].num_classes
            if self.num_classes != expected:
                raise ValueError(
                    f"CRNConfig.num_classes={self.num_classes} disagrees with label space "
                    f"{self.label_space!r}, which has {expected} classes"
                )

    @property
    def num_modules(self) -> int:
        return len(self.widths)

    @property
    def input_channels(self) -> int:
        """One-hot channels: the classes plus the void channel (last)."""
        return self.num_classes + 1

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (each module halves the size)."""
        return 2 ** (self.num_modules - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the preset was designed for."""
        return self.base_height * self.size_multiple, self.base_width * self.size_multiple

    @property
    def module_names(self) -> tuple[str, ...]:
        """Stable layer names by native scale, coarsest first: `module_4x8`, `module_8x16`, ..."""
        return tuple(f"module_{self.base_height * 2**i}x{self.base_width * 2**i}" for i in range(self.num_modules))

    def module_parameters(self) -> list[tuple[str, int]]:
        """Parameters of each module and of the head, counted from the architecture."""
        counts = []
        prev = 0
        norm = 2 if self.normalization == "layer" else 0  # gamma and beta per channel
        for name, width in zip(self.module_names, self.widths):
            conv1 = 9 * (prev + self.input_channels) * width
            conv2 = 9 * width * width
            counts.append((name, conv1 + conv2 + 2 * norm * width))
            prev = width
        counts.append(("head", self.widths[-1] * 3 * self.num_outputs + 3 * self.num_outputs))
        return counts

    def num_parameters(self) -> int:
        return sum(n for _, n in self.module_parameters())

    def get_label_space(self) -> labels.LabelSpace:
        """The model's label space: its recorded `classes`, else the built-in (or palette JSON) it names."""
        if self.classes is not None:
            return labels.LabelSpace(self.label_space, [n for n, _ in self.classes], [c for _, c in self.classes])
        return labels.get_label_space(self.label_space)

    def with_label_space(self, space: labels.LabelSpace) -> CRNConfig:
        """This architecture for the classes of `space` (e.g. a dataset's): the input channels follow
        its class count, and the whole space (names and colours) is recorded in the config."""
        classes = tuple(zip(space.class_names, space.palette))
        return dataclasses.replace(self, label_space=space.name, num_classes=space.num_classes, classes=classes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        if self.layer_weights is not None:
            d["layer_weights"] = list(self.layer_weights)
        if self.classes is not None:
            d["classes"] = [{"name": n, "color": list(c)} for n, c in self.classes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CRNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CRNConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, CRNConfig] = {
    # The released Cityscapes 256p model synthesizes a collection of 9 images (Sec. 3.4).
    "cityscapes_256p": CRNConfig(
        name="cityscapes_256p", widths=paper_widths(7), num_outputs=9, layer_weights=LAYER_WEIGHTS_256P
    ),
    "cityscapes_512p": CRNConfig(name="cityscapes_512p", widths=paper_widths(8), layer_weights=LAYER_WEIGHTS_512P),
    "cityscapes_1024p": CRNConfig(name="cityscapes_1024p", widths=paper_widths(9), layer_weights=LAYER_WEIGHTS_512P),
    # The released GTA model (GTA_Diversity_256p.py) is a k = 9 diversity model too: 27-channel head.
    "gta_256p": CRNConfig(
        name="gta_256p",
        label_space="gta5",
        widths=paper_widths(7),
        num_outputs=9,
        layer_weights=LAYER_WEIGHTS_GTA_256P,
    ),
    # NYUv2 frames are 480x640 (3:4). A 3x4 base keeps that aspect: 7 modules reach 192x256, the
    # "256p" of this dataset, with the same widths as the Cityscapes 256p cascade. The authors
    # released no NYU model, so the paper's automatic layer weights are used.
    "nyu_256p": CRNConfig(
        name="nyu_256p",
        label_space="nyu40",
        num_classes=40,
        widths=paper_widths(7),
        base_height=3,
        base_width=4,
        layer_weights=None,
    ),
    # `make demo`: 5 modules, 64x128 native, 0.8M parameters; ~0.5 s per batch-4 step on 2 CPU cores.
    "demo": CRNConfig(name="demo", widths=(128, 128, 96, 64, 32), layer_weights=LAYER_WEIGHTS_256P),
    # For tests: 3 modules, 16x32 native, a few thousand parameters per module.
    "tiny": CRNConfig(name="tiny", widths=(16, 16, 8), layer_weights=LAYER_WEIGHTS_256P),
}


def parse_size(text: str | None, flag: str = "--size") -> tuple[int, int] | None:
    """A size flag: "256x512" -> (256, 512); None, "", "none" or "full" -> None (the caller's default)."""
    if not text or text.lower() in ("none", "full"):
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected HxW, e.g. 256x512 (not HxW)") from None
    if h < 1 or w < 1:
        raise ValueError(f"{flag}={text!r}: height and width must be positive")
    return h, w


def get_preset(name: str, **overrides) -> CRNConfig:
    """Returns the named preset, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def summary(config: CRNConfig) -> str:
    """A human-readable table of the cascade and its parameter count."""
    h, w = config.native_size
    lines = [
        f"preset {config.name}: label space {config.label_space} ({config.num_classes} classes + void), "
        f"native size {h}x{w}, k={config.num_outputs}, upsampling {config.upsampling}",
        f"{'module':<18}{'width':>7}{'parameters':>14}",
    ]
    widths = dict(zip(config.module_names, config.widths))
    for name, count in config.module_parameters():
        width = widths.get(name, 3 * config.num_outputs)
        lines.append(f"{name:<18}{width:>7}{count:>14,}")
    total = config.num_parameters()
    lines.append(f"{'total':<18}{'':>7}{total:>14,}  ({total / 1e6:.1f}M)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show a CRN preset and its parameter count.")
    parser.add_argument("--preset", default="cityscapes_1024p", choices=sorted(PRESETS))
    parser.add_argument("--summary", action="store_true", help="print the module table (default)")
    parser.add_argument("--json", action="store_true", help="print the config as JSON instead")
    args = parser.parse_args(argv)
    config = get_preset(args.preset)
    print(config.to_json() if args.json else summary(config))


if __name__ == "__main__":
    main()
