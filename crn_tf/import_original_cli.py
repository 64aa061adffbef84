"""crn-import-original: the authors' released TF1 checkpoint -> a crn_tf model_dir.

    crn-import-original --checkpoint=result_512p/model.ckpt --preset=cityscapes_512p --model_dir=models/cs512
    # ~5 s and ~1.5 GB of RAM on a CPU for a released (~98M-parameter) model

Without --preset the architecture is read from the checkpoint and the config is named
`imported_<height>p`. The model_dir it writes works with crn-train --init_from, crn-synthesize and
crn-export. Also runs as `python -m crn_tf.import_original_cli`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from crn_tf import convert_original
from crn_tf.config import PRESETS

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (once; at run time, so importing this module defines none)."""
    if "checkpoint" in FLAGS:
        return
    flags.DEFINE_string(
        "checkpoint", None, "Original checkpoint prefix (e.g. result_512p/model.ckpt) or its directory."
    )
    flags.DEFINE_string("model_dir", None, "crn_tf model_dir to write (must not exist or be empty, see --overwrite).")
    flags.DEFINE_enum(
        "preset", None, sorted(PRESETS), "Preset the checkpoint must match; default: infer the architecture from it."
    )
    flags.DEFINE_string(
        "label_space", None, "Label space name or palette JSON; default: the preset's, or the built-in one that fits."
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --model_dir.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("checkpoint", "model_dir"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    try:
        result = convert_original.import_original(
            FLAGS.checkpoint,
            FLAGS.model_dir,
            preset=FLAGS.preset,
            label_space=FLAGS.label_space,
            overwrite=FLAGS.overwrite,
        )
    except ValueError as e:
        sys.exit(f"crn-import-original: {e}")
    print(result.summary(preset_given=FLAGS.preset is not None))


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
