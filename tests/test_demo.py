"""The demo pipeline (`make demo`) end to end, with the same code and tiny numbers."""

import dataclasses
import json
import time

import numpy as np
import pytest

from crn_tf import demo
from crn_tf.demo import Demo, DemoConfig


def tiny_config(out, **overrides) -> DemoConfig:
    return DemoConfig(
        output_dir=str(out), preset="tiny", height=16, width=32, train_count=4, val_count=2, steps=3, batch_size=2,
        budget_minutes=0, segmenter_steps=3, **overrides,
    )  # fmt: skip


def make_start_weights(config: DemoConfig, folder) -> None:
    """Starting weights for `config` made the shipped ones' way (save_start_weights), from untrained models."""
    from crn_tf.config import get_preset
    from crn_tf.model_dir import save_model_dir

    for i, loss in enumerate(demo.MODEL_NAMES):
        model = demo._built_model(get_preset(config.preset), config.height, config.width)
        save_model_dir(model, str(folder / f"{loss}-model"))
        meta = dict(demo.start_weights_key(config, loss), trained=f"test weights {i}", command="tests/test_demo.py")
        demo.save_start_weights(str(folder / f"{loss}-model"), str(folder / f"{loss}.npz"), meta)


@pytest.mark.slow
def test_demo_pipeline_end_to_end_and_idempotent(tmp_path):
    tmp_path = tmp_path / "we[ir]d *dir? ünï"  # paths are paths: glob characters, spaces, non-ASCII
    weights = tmp_path / "weights"
    config = tiny_config(tmp_path / "demo", start_weights=str(weights))
    make_start_weights(config, weights)
    lines = []
    summary = Demo(config, log=lines.append).run()
    out = tmp_path / "demo"
    commands = [line for line in lines if line.startswith("$ ")]
    assert [c.split()[1] for c in commands] == [
        "crn-convert", "crn-convert", "crn-segmenter", "crn-train", "crn-train", "crn-eval", "crn-eval", "crn-export",
        "crn-synthesize", "crn-synthesize",
    ]  # fmt: skip
    # The first line says where both CRNs start; both crn-train runs start from those weights.
    assert lines[0].startswith(f"crn_tf demo: both CRNs START FROM WEIGHTS SHIPPED IN {weights} (test weights 0)")
    assert "VGG-19 weights: none" in lines[1]
    trains = [c for c in commands if c.split()[1] == "crn-train"]
    assert all("--learning_rate=1e-05" in c for c in trains)
    assert [c.split("--init_from=")[1] for c in trains] == [str(out / "start/perceptual"), str(out / "start/image")]
    assert sum("initialised from" in line for line in lines) == 2
    assert summary["start"].startswith(f"from the weights shipped in {weights} (test weights 0; made by")
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
    # The last line: what was seen, in one sentence, and what to run next.
    assert set(summary) >= {f"beats_class_mean_colour_on_{m}" for m in ("l1", "vgg_distance", "miou")}
    assert lines[-1].startswith("In short: a tiny-preset CRN, starting from the shipped weights and trained 3 steps")
    assert "crn-import-original --download=cityscapes_256p --model_dir=" in lines[-1] and lines[-1].count(". ") == 0

    again = []
    Demo(config, log=again.append).run()  # reuses everything, and runs no command at all
    assert [line for line in again if line.startswith("$ ")] == []
    # 2 starting model_dirs, scenes, 2 splits, the segmenter, the plan, 2 models, 2 evals, the export, 2
    # synthesized folders
    assert sum(line.startswith("[reuse]") for line in again) == 14
    assert (out / "export/crn/1").exists() and not (out / "export/crn/2").exists()
    # The same output_dir from scratch: its models started elsewhere, said before anything is trained.
    with pytest.raises(ValueError, match=r"plan.json: this output_dir's models started from the weights"):
        Demo(dataclasses.replace(config, start_weights=None), log=lambda line: None).run()


def test_the_shipped_weights_fit_the_demo_and_load_as_they_were_saved(tmp_path):
    """crn_tf/demo_weights/{perceptual,image}.npz: small, made by the committed script for this very demo
    (preset, size, scenes, random VGG-19), trained the same way for both losses, and written to a model_dir
    for --init_from with every value as stored."""
    from crn_tf.model_dir import load_model

    config = demo.parse_config([])
    assert config.start_weights == str(demo.WEIGHTS_DIR) and config.steps == 200
    assert config.finetune_learning_rate == 1e-5
    metas = {}
    for loss in demo.MODEL_NAMES:
        path = demo.WEIGHTS_DIR / f"{loss}.npz"
        assert path.stat().st_size < 2_000_000  # float16: ~1.7 MB each
        arrays, metas[loss] = demo.read_start_weights(path, config, loss)
        assert metas[loss]["command"].startswith("python benchmarks/train_demo_weights.py")
        assert all(a.dtype == np.float16 for a in arrays.values())
        demo.write_start_model_dir(arrays, config, tmp_path / loss, path)
        model = load_model(str(tmp_path / loss))
        for name, w in demo._variables(model).items():
            np.testing.assert_array_equal(w.numpy(), arrays[name].astype(np.float32))
    assert metas["perceptual"]["trained"] == metas["image"]["trained"]  # a fair comparison
    assert metas["perceptual"]["phases"] == metas["image"]["phases"]


def test_starting_weights_for_another_demo_or_damaged_ones_are_refused_by_name(tmp_path):
    config = tiny_config(tmp_path / "demo")
    with pytest.raises(ValueError, match=r"perceptual.npz was trained for another demo: crn_config .*size \[64, 128\]"):
        demo.read_start_weights(demo.WEIGHTS_DIR / "perceptual.npz", config, "perceptual")
    with pytest.raises(ValueError, match=r"image.npz was trained for another demo: loss 'image' \(this demo: 'perc"):
        demo.read_start_weights(demo.WEIGHTS_DIR / "image.npz", demo.parse_config([]), "perceptual")
    with pytest.raises(ValueError, match=r"nope.npz: starting weights not found; run with --from_scratch"):
        demo.read_start_weights(tmp_path / "nope.npz", config, "perceptual")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"bad.npz: not a readable starting-weights file .*--from_scratch"):
        demo.read_start_weights(tmp_path / "bad.npz", config, "perceptual")
    make_start_weights(config, tmp_path)  # the right record, but a variable of another shape
    arrays, _ = demo.read_start_weights(tmp_path / "image.npz", config, "image")
    arrays["head/conv/kernel"] = arrays["head/conv/kernel"][..., :2]
    with pytest.raises(ValueError, match=r"image.npz does not fit preset tiny: .*other shapes \['head/conv/kernel"):
        demo.write_start_model_dir(arrays, config, tmp_path / "start", tmp_path / "image.npz")
    assert not (tmp_path / "start").exists()


def test_from_scratch_trains_from_zero_at_the_from_scratch_rate(tmp_path, monkeypatch):
    """--from_scratch: no starting weights are read and crn-train gets no --init_from (the command line
    is all that differs; the end-to-end test runs the other path)."""
    config = demo.parse_config([f"--output_dir={tmp_path}", "--from_scratch"])
    assert config.start_weights is None and config.steps == demo.FROM_SCRATCH_STEPS
    assert demo.parse_config(["--vgg_weights=imagenet"]).start_weights is None  # shipped ones: random VGG-19
    ran = []

    def fake_cli(self, name, module, *args, deadline=None):
        ran.append(args)
        model_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--model_dir="))
        (tmp_path / model_dir).mkdir(parents=True)
        (tmp_path / model_dir / "ckpt-400.index").write_bytes(b"")
        return ""

    monkeypatch.setattr(Demo, "cli", fake_cli)
    lines = []
    runner = Demo(config, log=lines.append)
    runner.prepare_start()
    assert lines == ["crn_tf demo: both CRNs train from zero (--from_scratch)."]
    assert runner.train("perceptual", "perceptual", 400) == 400
    assert "--learning_rate=0.001" in ran[0] and not any(a.startswith("--init_from") for a in ran[0])


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
