"""crn-import-original: the authors' released TF1 checkpoint -> a crn_tf model_dir.

    crn-import-original --checkpoint=result_512p/model.ckpt --preset=cityscapes_512p --model_dir=models/cs512
    # ~5 s and ~1.5 GB of RAM on a CPU for a released (~98M-parameter) model
    crn-import-original --download=cityscapes_512p --model_dir=models/cs512
    # the same, after downloading the checkpoint from the authors' server (crn_tf/download_original.py)

Without --preset the architecture is read from the checkpoint and the config is named
`imported_<height>p`. The model_dir it writes works with crn-train --init_from, crn-synthesize and
crn-export. Also runs as `python -m crn_tf.import_original_cli`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from crn_tf import convert_original, download_original, fileio
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
    flags.DEFINE_enum(
        "download",
        None,
        list(download_original.RELEASES),
        "Instead of --checkpoint: download this release of the authors' (its preset is the default "
        "--preset) and import it.",
    )
    flags.DEFINE_string(
        "download_base_url",
        None,
        f"With --download: the server; default ${download_original.BASE_URL_ENV}, else the authors' "
        f"({download_original.AUTHORS_BASE_URL}).",
    )
    flags.DEFINE_string(
        "download_dir",
        None,
        "With --download: local directory that keeps (and resumes) the downloaded checkpoints; default "
        "$XDG_CACHE_HOME/crn_tf/original or ~/.cache/crn_tf/original.",
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fileio.quiet_absl_logging()
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required")
    if bool(FLAGS.checkpoint) == bool(FLAGS.download):
        raise app.UsageError("pass one of --checkpoint (a checkpoint on disk) or --download (a release to fetch)")
    if not FLAGS.download:
        for name in ("download_base_url", "download_dir"):
            if FLAGS[name].present:
                raise app.UsageError(f"--{name} only applies with --download")
    try:
        if FLAGS.download:
            result = download_original.import_release(
                FLAGS.download,
                FLAGS.model_dir,
                download_dir=FLAGS.download_dir,
                base_url=FLAGS.download_base_url,
                preset=FLAGS.preset,
                label_space=FLAGS.label_space,
                overwrite=FLAGS.overwrite,
            )
        else:
            result = convert_original.import_original(
                FLAGS.checkpoint,
                FLAGS.model_dir,
                preset=FLAGS.preset,
                label_space=FLAGS.label_space,
                overwrite=FLAGS.overwrite,
            )
    except (ValueError, download_original.DownloadError) as e:
        sys.exit(f"crn-import-original: {e}")
    print(result.summary(preset_given=FLAGS.preset is not None or FLAGS.download is not None))


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
