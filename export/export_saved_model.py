"""crn-export: a CRN model_dir (or .keras file) -> a verified, versioned SavedModel for TF Serving.

    crn-export --model_dir=runs/tiny --export_base=exports/crn     # tiny model: ~15 s on 2 CPU cores
    python -m export.export_saved_model --model_dir=runs/city256 --export_base=exports/crn --version=3

Writes exports/crn/<version>/ (next integer unless --version) with TF Serving warmup requests at
--warmup_size (default: the model's native size), checks it in a fresh process with the TF1
SavedModel loader as TF Serving loads it, renames it into place, writes exports/models.config and
prints the docker command and example requests. The paper-width models take minutes (the check
runs the warmup requests through both the export and the Keras model).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags, logging

from crn_tf.config import parse_size
from crn_tf.model import load_model
from export.saved_model import ExportVerificationError, export_saved_model, serving_instructions

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines crn-export's flags (once; at run time, so importing this module defines none)."""
    if "export_base" in FLAGS:
        return
    flags.DEFINE_string("model_dir", None, "model_dir (latest checkpoint), checkpoint prefix or .keras file")
    flags.DEFINE_string("export_base", None, "the served model's base directory, e.g. exports/crn")
    flags.DEFINE_integer("version", None, "version number (default: one more than the largest existing)")
    flags.DEFINE_string("warmup_size", None, "HxW of the warmup requests (default: the model's native size)")
    flags.DEFINE_bool("overwrite", False, "replace an existing version directory")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("model_dir", "export_base"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TF's INFO lines about signature renaming are noise here
    try:
        warmup_size = parse_size(FLAGS.warmup_size, "--warmup_size")
        model = load_model(FLAGS.model_dir)
        result = export_saved_model(
            model, FLAGS.export_base, version=FLAGS.version, warmup_size=warmup_size, overwrite=FLAGS.overwrite
        )
    except (ValueError, ExportVerificationError) as e:
        sys.exit(f"crn-export: {e}")
    print(serving_instructions(result))


def run() -> None:
    """Console-script entry point: `crn-export`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
