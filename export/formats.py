"""What crn-export writes: one or more formats (SavedModel for TF Serving, ONNX) of one model under one version."""

from __future__ import annotations

from collections.abc import Sequence

from crn_tf.model_dir import load_model
from export.saved_model import export_saved_model, next_version, serving_instructions

FORMATS = ("saved_model", "onnx")


def parse_formats(values: Sequence[str]) -> list[str]:
    """The --format values, checked and deduplicated, in FORMATS order."""
    unknown = sorted(set(values) - set(FORMATS))
    if unknown or not values:
        raise ValueError(f"--format={','.join(values)}: expected one or more of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in values]


def export_model(
    model_path: str,
    export_base: str,
    formats: Sequence[str] = ("saved_model",),
    version: int | None = None,
    warmup_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> str:
    """Exports the model at `model_path` (model_dir, checkpoint or .keras) in `formats`; returns what to run next.

    Raises:
        ValueError: bad formats or sizes, an existing version without `overwrite`, an unreadable model.
        ImportError: ONNX asked for without the `onnx` extra (checked before anything is written).
        ExportVerificationError: an export did not compute what the Keras model computes.
    """
    formats = parse_formats(formats)
    if "onnx" in formats:
        from export import onnx_export  # needs the `onnx` extra

        onnx_export.check_dependencies()  # before anything is written
        if version is None and len(formats) > 1:  # one version number for both: the same weights
            base = export_base.rstrip("/")
            version = max(next_version(base), next_version(onnx_export.onnx_base(base)))
    model = load_model(model_path)
    kwargs = dict(version=version, warmup_size=warmup_size, overwrite=overwrite)
    messages = []
    if "onnx" in formats:  # first: tf2onnx is likelier to fail than the SavedModel export
        messages.append(onnx_export.onnx_instructions(onnx_export.export_onnx(model, export_base, **kwargs)))
    if "saved_model" in formats:
        messages.insert(0, serving_instructions(export_saved_model(model, export_base, **kwargs)))
    return "\n".join(messages)
