"""The weights `make demo` starts from (crn_tf/demo_weights/{perceptual,image}.npz), made reproducibly.

    python benchmarks/train_demo_weights.py --work_dir=/tmp/demo_weights   # writes crn_tf/demo_weights/

On the demo's own generated scenes (crn_tf.demo's scenes, conversion and segmenter: its 64 training
scenes of seed 0 at 64x128, and its 8 validation scenes), it trains the `demo` preset with the
perceptual loss (random VGG-19, as the demo) and, in exactly the same way, with the image-space loss
of eq. 4: one crn-train run per phase of --phases (steps:learning_rate), each phase starting from the
last one's weights (--init_from: a fresh Adam) with the demo's batch size and seed. Every phase's end
is evaluated on the validation scenes (crn-eval with the per-class mean colour and the segmenter), and
the last phase is written as float16 arrays with a record of how it was made (crn_tf.demo's
save_start_weights; the demo checks the record against its own preset, size, scenes and VGG-19
weights). The written files are then read back the demo's way and evaluated again, so the figures
printed last are those of the shipped weights. Everything in --work_dir is reused on a second run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from crn_tf import demo  # noqa: E402

METRICS = ("l1", "psnr", "ssim", "perceptual")


def parse_phases(text: str) -> list[tuple[int, float]]:
    """--phases "2000:1e-3,400:1e-4" -> [(2000, 0.001), (400, 0.0001)]."""
    phases = []
    for part in text.split(","):
        try:
            steps, rate = part.split(":")
            phases.append((int(steps), float(rate)))
        except ValueError:
            raise SystemExit(
                f"--phases={text!r}: expected steps:learning_rate[,...], e.g. 2000:1e-3,400:1e-4"
            ) from None
    if not phases or any(s < 1 or r <= 0 for s, r in phases):
        raise SystemExit(f"--phases={text!r}: every phase needs steps >= 1 and a learning rate > 0")
    return phases


def evaluate(runner: demo.Demo, model_dir: pathlib.Path) -> dict:
    """crn-eval on the validation scenes (as the demo runs it): the model's, the baseline's and the
    real photos' rows, as {row: {metric: value}}."""
    path = model_dir / "eval_val.json"
    if not path.exists():
        runner.cli(
            "crn-eval",
            "crn_tf.evaluate",
            f"--model_dir={model_dir}",
            f"--data_dir={runner.out / 'tfrecords'}",
            "--split=val",
            f"--batch_size={runner.c.batch_size}",
            f"--vgg_weights={runner.c.vgg_weights}",
            "--perceptual_weights=uniform",
            "--baseline",
            f"--segmenter={runner.out / 'segmenter'}",
            "--noprogress",
        )
    rows = json.loads(path.read_text())["rows"]
    return {
        row: {k: rows[row][k] for k in (*METRICS, "miou", "pixel_accuracy") if k in rows[row]}
        for row in ("model", "baseline_class_mean_colour")
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="scenes, TFRecords, segmenter and phase model_dirs")
    parser.add_argument("--phases", default="2000:1e-3,500:1e-4", help="steps:learning_rate, comma-separated")
    parser.add_argument("--output", default=str(demo.WEIGHTS_DIR), help="folder the .npz files go to")
    parser.add_argument("--losses", default=",".join(demo.MODEL_NAMES), help="which models to train")
    args = parser.parse_args(argv)
    phases = parse_phases(args.phases)
    command = "python benchmarks/train_demo_weights.py --work_dir=... --phases=" + args.phases
    # The demo's own sizes, scenes, batch and seed; its training is replaced by the phases below.
    config = demo.DemoConfig(output_dir=args.work_dir, start_weights=None)
    runner = demo.Demo(config)
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.generate()
    runner.convert()
    runner.train_segmenter()
    figures = {}
    for loss in args.losses.split(","):
        if loss not in demo.MODEL_NAMES:
            raise SystemExit(f"--losses: {loss!r} is not one of {demo.MODEL_NAMES}")
        previous = None
        for i, (steps, rate) in enumerate(phases):
            model_dir = runner.out / "models" / f"{loss}-phase{i}"
            if demo.latest_step(model_dir) < steps:
                runner.log(f"[{runner.elapsed()}] {loss} loss, phase {i}: {steps} steps at learning rate {rate:g}")
                runner.cli(
                    "crn-train",
                    "crn_tf.train",
                    f"--preset={config.preset}",
                    f"--data_dir={runner.out / 'tfrecords'}",
                    f"--model_dir={model_dir}",
                    f"--steps={steps}",
                    f"--batch_size={config.batch_size}",
                    f"--learning_rate={rate}",
                    f"--loss={loss}",
                    f"--vgg_weights={config.vgg_weights}",
                    f"--checkpoint_every={max(1, steps // 4)}",
                    f"--image_every={steps}",
                    f"--summary_every={max(1, steps // 50)}",
                    f"--seed={config.seed + i}",  # each phase its own order of the scenes
                    *([f"--init_from={previous}"] if previous else []),
                )
            figures[f"{loss} phase {i} ({steps} steps at {rate:g})"] = evaluate(runner, model_dir)
            previous = model_dir
        total = sum(s for s, _ in phases)
        trained = f"{total} steps of batch {config.batch_size} on the same {config.train_count} generated scenes: " + (
            ", then ".join(f"{s} at learning rate {r:g}" for s, r in phases)
        )
        meta = dict(demo.start_weights_key(config, loss), trained=trained, command=command, phases=phases)
        output = pathlib.Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        demo.save_start_weights(str(previous), str(output / f"{loss}.npz"), meta)
        # Read back the demo's way (checks the record, float16 -> float32) and evaluated as shipped.
        arrays, _ = demo.read_start_weights(output / f"{loss}.npz", config, loss)
        shipped = runner.out / "shipped" / loss
        if shipped.exists():
            import shutil

            shutil.rmtree(shipped)
        demo.write_start_model_dir(arrays, config, shipped, output / f"{loss}.npz")
        figures[f"{loss}: {output / (loss + '.npz')} as shipped"] = evaluate(runner, shipped)
    report = json.dumps(figures, indent=2)
    (runner.out / "figures.json").write_text(report + "\n")
    print(report)
    print(f"done in {runner.elapsed()}")


if __name__ == "__main__":
    main()
