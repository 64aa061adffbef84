"""crn-export: a CRN model_dir (or .keras file) -> a verified, versioned SavedModel for TF Serving, and/or ONNX.

    crn-export --model_dir=runs/tiny --export_base=exports/crn     # tiny model: ~15 s on 2 CPU cores
    python -m export.export_saved_model --model_dir=runs/city256 --export_base=exports/crn --version=3
    crn-export --model_dir=runs/tiny --export_base=exports/crn --format=onnx   # ~10 s; needs crn_tf[onnx]

Writes exports/crn/<version>/ (next integer unless --version) with TF Serving warmup requests at
--warmup_size (default: the model's native size), checks it in a fresh process with the TF1
SavedModel loader as TF Serving loads it, renames it into place, writes exports/models.config and
prints the docker command and example requests. The paper-width models take minutes (the check
runs the warmup requests through both the export and the Keras model).

`--format=onnx` writes exports/crn/onnx/<version>/{model.onnx, generator.onnx} instead (export.onnx_export:
uint8 label ids -> uint8 image, and the float generator; opset 17), checked with onnxruntime in a
fresh process before the rename; `--format=saved_model,onnx` writes both under one version number.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from crn_tf import fileio
from crn_tf.config import parse_size
from export.formats import FORMATS, export_model, parse_formats  # noqa: F401 - parse_formats: re-exported
from export.saved_model import ExportVerificationError

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
    flags.DEFINE_list("format", ["saved_model"], f"what to export, one or more of {', '.join(FORMATS)}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("model_dir", "export_base"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    fileio.quiet_absl_logging()  # TF's INFO lines about signature renaming are noise here
    try:
        message = export_model(
            FLAGS.model_dir, FLAGS.export_base, FLAGS.format, version=FLAGS.version,
            warmup_size=parse_size(FLAGS.warmup_size, "--warmup_size"), overwrite=FLAGS.overwrite,
        )  # fmt: skip
    except (ValueError, ImportError, ExportVerificationError) as e:
        sys.exit(f"crn-export: {e}")
    print(message)


def run() -> None:
    """Console-script entry point: `crn-export`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
