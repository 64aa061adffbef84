"""crn-convert: dataset -> TFRecord shards + manifest for crn_tf.data.make_dataset.

    crn-convert synthetic --input=/tmp/synth --output_dir=/tmp/synth_tfr --count=64 --size=128x256  # ~8 s on 2 cores
    crn-convert cityscapes --input=/data/cityscapes --output_dir=/data/cs256 --split=train --resize=256x512 \
        --workers=8   # 2975 pairs; time = pairs / the images/s of benchmarks/README.md
    crn-convert gta --input=/data/gta5 --output_dir=/data/gta256 --resize=256x512 --skip_bad
    crn-convert nyu --input=/data/nyu_depth_v2_labeled.mat --nyu_mapping=classMapping40.mat --output_dir=/data/nyu
    crn-convert ade20k --input=/data/ADEChallengeData2016 --output_dir=/data/ade256 --split=train --resize=256x256
    crn-convert cocostuff --input=/data/cocostuff --output_dir=/data/coco256 --split=train --resize=256x256
    crn-convert folder --input=/data/pairs --label_format=colors --label_space=palette.json --output_dir=/data/p

Also `python -m data_tools.convert ...`. Library code: data_tools.common.convert and the converters.
"""

import dataclasses
import json
import os

from absl import app, flags

from crn_tf.config import parse_size
from data_tools import cityscapes, common, folder
from data_tools.sources import DATASETS, SourceOptions, make_source

SOURCE_FLAGS = [f.name for f in dataclasses.fields(SourceOptions)]  # each is a flag of the same name
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines crn-convert's flags (once; at run time, so importing this module defines none)."""
    if "num_shards" in FLAGS:
        return
    flags.DEFINE_string(
        "input", None, "Dataset root folder (nyu: the .mat file; synthetic: where scenes are generated)."
    )
    flags.DEFINE_string("output_dir", None, "Where the shards and {split}.json go.")
    flags.DEFINE_string("split", "train", "Split name (Cityscapes: the folder under leftImg8bit/).")
    flags.DEFINE_integer(
        "num_shards", 0, "Number of TFRecord shards; 0 = by size (~256 MB each, at least 16 for parallel reads)."
    )
    flags.DEFINE_string(
        "resize", "", "HxW to resize to (area for photos, nearest for labels); empty = full resolution."
    )
    flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Threads decoding and encoding in parallel.")
    flags.DEFINE_bool("skip_bad", False, "List bad files in the manifest's 'skipped' instead of stopping.")
    flags.DEFINE_bool("progress", True, "Show a progress bar with images/s.")
    flags.DEFINE_enum("label_route", "labelIds", list(cityscapes.ROUTES), "cityscapes: labelIds or _color.png labels.")
    flags.DEFINE_enum("label_format", "ids", list(folder.LABEL_FORMATS), "folder: labels as train ids or colours.")
    flags.DEFINE_string("label_space", "cityscapes", "folder: built-in label space name or palette JSON path.")
    flags.DEFINE_string("nyu_mapping", None, "nyu: classMapping40.mat, or .npy/.json of 894/895 ints (raw -> 1..40).")
    flags.DEFINE_string("nyu_indices", None, "nyu: .json/.npy of 1-based frame indices for this split (default all).")
    flags.DEFINE_integer("count", 64, "synthetic: number of scenes.")
    flags.DEFINE_string("size", "128x256", "synthetic: HxW of the generated scenes.")
    flags.DEFINE_integer("seed", 0, "Seeds the order of the pairs across shards (synthetic: also the scenes).")


def main(argv):
    if len(argv) != 2 or argv[1] not in DATASETS:
        raise app.UsageError(f"usage: crn-convert <{'|'.join(DATASETS)}> --input=... --output_dir=... [flags]")
    for name in ("input", "output_dir"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    try:
        source = make_source(argv[1], SourceOptions(**{n: FLAGS[n].value for n in SOURCE_FLAGS}))
        resize = parse_size(FLAGS.resize, "--resize")
        manifest = common.convert(
            source, FLAGS.output_dir, FLAGS.split, num_shards=FLAGS.num_shards or None, resize=resize,
            workers=FLAGS.workers, skip_bad=FLAGS.skip_bad, progress=FLAGS.progress, seed=FLAGS.seed,
        )  # fmt: skip
    except ValueError as e:  # ConversionError included: the message names the file and the problem
        raise SystemExit(f"crn-convert: {e}") from None
    summary = {k: manifest[k] for k in ("count", "sizes", "shards")} | {"skipped": len(manifest["skipped"])}
    print(json.dumps(summary | {"images_per_second": round(manifest["images_per_second"], 1)}))


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
