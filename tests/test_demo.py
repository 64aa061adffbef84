"""The demo pipeline (`make demo`) end to end, with the same code and tiny numbers."""

import json
import time

import pytest

from crn_tf import demo
from crn_tf.demo import Demo, DemoConfig


@pytest.mark.slow
def test_demo_pipeline_end_to_end_and_idempotent(tmp_path):
    tmp_path = tmp_path / "we[ir]d *dir? ünï"  # paths are paths: glob characters, spaces, non-ASCII
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), preset="tiny", height=16, width=32, train_count=4, val_count=2, steps=3,
        batch_size=2, budget_minutes=0, segmenter_steps=3,
    )  # fmt: skip
    lines = []
    summary = Demo(config, log=lines.append).run()
    out = tmp_path / "demo"
    commands = [line for line in lines if line.startswith("$ ")]
    assert [c.split()[1] for c in commands] == [
        "crn-convert", "crn-convert", "crn-segmenter", "crn-train", "crn-train", "crn-eval", "crn-eval", "crn-export",
        "crn-synthesize", "crn-synthesize",
    ]  # fmt: skip
    assert "VGG-19 weights: none" in lines[0]
    # The commands' own output is shown as it comes: crn-train's progress lines, with a time estimate.
    assert any("step 3/3" in line and "eta" in line for line in lines)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["perceptual_model"]) == {"l1", "psnr", "ssim", "perceptual"}
    assert summary["steps"] == 3 and summary["training"] == "3 steps of batch 2 per model"
    report = (out / "report.html").read_text()
    assert "same CRN, image-space loss (eq. 4)" in report and "<svg" in report and "<img" in report
    assert "cannot show the paper&#x27;s effect" in report  # random VGG-19: no claim about the two losses
    # The segmenter's scores for the real photos, both CRNs and the baseline (values: tests/test_segmenter.py).
    assert "<h2>Segmentation scores</h2>" in report and "real photos (ceiling)" in report
    assert "by class name" in report  # the label mapping, stated
    assert set(summary["segmentation"]) == {
        "real_photos", "perceptual_model", "image_loss_model", "class_mean_colour_baseline"
    }  # fmt: skip
    assert all(0 <= v["pixel_accuracy"] <= 1 for v in summary["segmentation"].values())
    assert (out / "segmenter/saved_model.pb").exists() and (out / "models/perceptual/eval_val.md").exists()
    assert (out / "export/crn/1/saved_model.pb").exists() and (out / "export/models.config").exists()
    assert len(list((out / "synthesized/val").glob("*.png"))) == 2
    assert len(list((out / "synthesized/examples").glob("*.png"))) == 7  # examples/layouts
    assert any(line.startswith("  report: ") for line in lines)

    again = []
    Demo(config, log=again.append).run()  # reuses everything, and runs no command at all
    assert [line for line in again if line.startswith("$ ")] == []
    # scenes, 2 splits, the segmenter, the plan, 2 models, 2 evals, the export, 2 synthesized folders
    assert sum(line.startswith("[reuse]") for line in again) == 12
    assert (out / "export/crn/1").exists() and not (out / "export/crn/2").exists()


def test_a_command_past_its_deadline_gets_sigterm_and_its_output_is_shown_live(tmp_path, monkeypatch):
    """The time budget: at the deadline the demo sends SIGTERM (crn-train then saves and stops); lines
    (and carriage-return progress updates) are logged as they come, not when the command ends."""
    (tmp_path / "slow_tool.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('saving, then stopping', flush=True), sys.exit(0)))\n"
        "print('step 1\\rstep 2', flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    seen = []

    def log(line):
        seen.append((time.monotonic(), line))

    runner = Demo(DemoConfig(output_dir=str(tmp_path / "out")), log=log)
    t0 = time.monotonic()
    runner.cli("slow-tool-not-installed", "slow_tool", deadline=t0 + 3)
    lines = [line for _, line in seen]
    assert lines[1:3] == ["  step 1", "  step 2"] and "time budget reached" in lines[3]
    assert lines[-1] == "  saving, then stopping"
    assert seen[1][0] - t0 < 2.5  # shown before the deadline: live
    assert 3 <= time.monotonic() - t0 < 30
    (tmp_path / "failing_tool.py").write_text("print('bad input: x.png'); raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match=r"failing-tool failed \(exit 3\):\nbad input: x.png"):
        runner.cli("failing-tool", "failing_tool")


def test_latest_step_reads_the_checkpoint_state_file(tmp_path):
    assert demo.latest_step(tmp_path) == 0
    for step in (100, 120):  # the checkpoints' files (only ones that exist count)
        (tmp_path / f"ckpt-{step}.index").write_bytes(b"")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-120"\n'
        'all_model_checkpoint_paths: "ckpt-100"\n'
        'all_model_checkpoint_paths: "ckpt-120"\n'
    )
    assert demo.latest_step(tmp_path) == 120
