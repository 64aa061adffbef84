"""The demo pipeline (`make demo`) end to end, with the same code and tiny numbers."""

import json

import pytest

from crn_tf.demo import Demo, DemoConfig

pytestmark = pytest.mark.slow


def test_demo_pipeline_end_to_end_and_idempotent(tmp_path):
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), preset="tiny", height=16, width=32, train_count=4, val_count=2, steps=3,
        batch_size=2,
    )  # fmt: skip
    lines = []
    summary = Demo(config, log=lines.append).run()
    out = tmp_path / "demo"
    commands = [line for line in lines if line.startswith("$ ")]
    assert [c.split()[1] for c in commands] == [
        "crn-convert", "crn-convert", "crn-train", "crn-train", "crn-eval", "crn-eval", "crn-export",
        "crn-synthesize", "crn-synthesize",
    ]  # fmt: skip
    assert "VGG-19 weights: none" in lines[0]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["perceptual_model"]) == {"l1", "psnr", "ssim", "perceptual"}
    report = (out / "report.html").read_text()
    assert "same CRN, image-space loss (eq. 4)" in report and "<svg" in report and "<img" in report
    assert (out / "export/crn/1/saved_model.pb").exists() and (out / "export/models.config").exists()
    assert len(list((out / "synthesized/val").glob("*.png"))) == 2
    assert len(list((out / "synthesized/examples").glob("*.png"))) == 7  # examples/layouts
    assert any(line.startswith("  report: ") for line in lines)

    again = []
    Demo(config, log=again.append).run()  # reuses everything; crn-train resumes and returns at once
    assert [line.split()[1] for line in again if line.startswith("$ ")] == ["crn-train", "crn-train"]
    assert sum(line.startswith("[reuse]") for line in again) == 8  # scenes, 2 splits, 2 evals, export, 2 synth
    assert (out / "export/crn/1").exists() and not (out / "export/crn/2").exists()
