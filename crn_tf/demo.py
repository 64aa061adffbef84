"""`make demo`: the whole job end to end on data it generates, with the project's own commands.

    python -m crn_tf.demo --output_dir=demo_output   # at most ~13 min on 2 CPU cores (make demo adds the .venv)

1. generates synthetic street scenes in the Cityscapes layout (train + val),
2. converts them to TFRecords (crn-convert), and trains a small segmentation network on the
   training scenes, exported as a SavedModel (crn-segmenter), to score synthesized photos with,
3. trains the `demo` preset with the perceptual loss for up to --steps steps or until its share of
   the time budget (--budget_minutes) is spent, whichever comes first (crn-train saves and stops on
   SIGTERM), then the same architecture for the same number of steps with the image-space loss of
   eq. 4 as a baseline (crn-train); every command's output, progress bars included, is shown live,
4. evaluates both on val, with the per-class mean colour baseline (crn-eval); the segmenter's mean
   IoU and pixel accuracy on the real val photos, both CRNs' photos and the baseline's paintings,
5. exports the perceptual model for TF Serving and verifies the export (crn-export),
6. synthesizes the val layouts and the real layouts in examples/layouts (crn-synthesize),
7. writes report.html (grids, loss curves, the comparison table) and summary.json.

Every step is skipped when its output exists, so a second run reuses what is done (plan.json
records the steps the budget allowed). Without ImageNet VGG-19 weights (the default here: nothing
is downloaded) the "perceptual" loss uses a seeded random VGG-19: the pipeline is the real one, the
images are far from the paper's, and the two losses cannot be told apart (see the report).
`VGG_WEIGHTS=imagenet make demo` uses Keras' ImageNet weights (downloaded once, ~80 MB).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "layouts"
# TensorFlow's C++ start-up lines (oneDNN, CUDA probing), printed before its log level applies.
TF_NOISE = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl|  ?on\. You may see slightly)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (the test runs the same code with tiny numbers)."""

    output_dir: str = "demo_output"
    preset: str = "demo"
    height: int = 64
    width: int = 128
    train_count: int = 64
    val_count: int = 8
    steps: int = 400  # at most; fewer if the perceptual training's share of the budget runs out first
    batch_size: int = 4
    learning_rate: float = 1e-3
    vgg_weights: str = "none"
    seed: int = 0
    segmenter_steps: int = 400  # ~45 s at 64x128 on 2 cores; trained before the CRNs, inside the budget
    # Wall-clock budget of the whole run in minutes (0 = none). The perceptual-loss training gets
    # TRAIN_SHARE of what is left when it starts; the rest (the image-loss baseline, which needs no
    # VGG-19 and so runs ~3x faster, evaluation, export, synthesis) fits in the remainder.
    budget_minutes: float = 13.0


# The perceptual-loss training's share of the budget left when it starts. Measured on 2 cores shared
# with other jobs, `--budget_minutes=4`: segmenter 86 s, perceptual training 91 s (stopped by the budget
# at step 121), the image-loss baseline 29 s for the same steps (0.32x), evaluation + export + synthesis
# 39 s; 4 min 12 s in all. So 0.6 for the perceptual training leaves 0.19 for the baseline and 0.21 for
# the fixed tail: tight at a 4-minute budget (5% over), ample at the default 13 minutes.
TRAIN_SHARE = 0.6
PLAN_FILE = "plan.json"
RANDOM_VGG_CAVEAT = (
    "With a random VGG-19 (the default: nothing is downloaded) the demo cannot show the paper's effect: the "
    "deep-layer terms are small next to the image term, so the two losses train nearly the same model: in four "
    "400-step runs the perceptual-loss CRN's VGG distance was 0.28 and 0.05 lower and 0.37 and 0.13 higher than "
    "the image-loss CRN's, while two runs of the same command differ by ~0.3. The table shows the pipeline "
    "works, not which loss is better; "
    "that needs the ImageNet weights (VGG_WEIGHTS=imagenet make demo) and longer training."
)
ONE_RUN_CAVEAT = (
    "One run of one seed: how far two runs of this command spread with these VGG-19 weights has not been "
    "measured (with random weights it was ~0.3 VGG distance), so small differences between the two losses "
    "are not evidence for either."
)


def loss_comparison_caveat(vgg_weights: str) -> str:
    return RANDOM_VGG_CAVEAT if vgg_weights == "none" else ONE_RUN_CAVEAT


def latest_step(model_dir: pathlib.Path) -> int:
    """The step of a model_dir's newest checkpoint (crn_tf.model_dir.checkpoints: its files must exist), or 0."""
    from crn_tf.model_dir import checkpoints

    found = checkpoints(str(model_dir)) if model_dir.is_dir() else []
    return int(found[0].rsplit("-", 1)[1]) if found else 0


class Demo:
    def __init__(self, config: DemoConfig, log=print):
        self.c = config
        self.out = pathlib.Path(config.output_dir).resolve()
        self.log = log
        self.commands: list[str] = []
        self.start = time.monotonic()
        self.trained: dict[str, dict] = {}  # per model: steps, seconds, whether the budget stopped it

    # ---- helpers ----
    def cli(self, name: str, module: str, *args: str, deadline: float | None = None) -> str:
        """Runs a console script (from this interpreter's bin/ if installed, else `python -m`), showing
        its output as it comes. At `deadline` (time.monotonic()) it gets SIGTERM (crn-train saves, stops)."""
        script = shutil.which(name, path=os.path.dirname(sys.executable))
        argv = [script] if script else [sys.executable, "-m", module]
        shown = " ".join([name, *args])
        self.commands.append(shown)
        self.log(f"$ {shown}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [*argv, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        output = []
        if deadline is not None:  # a timer, so the signal goes out even while the command prints nothing

            def stop():
                self.log(f"  [demo] time budget reached: stopping {name} (it saves a checkpoint first)")
                proc.send_signal(signal.SIGTERM)

            timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop)
            timer.start()
        try:
            for line in proc.stdout:
                output.append(line)
                for part in line.rstrip("\n").split("\r"):  # a progress bar's carriage returns
                    if part.strip() and not TF_NOISE.match(part):
                        self.log(f"  {part[-200:]}")
            returncode = proc.wait()
        finally:
            if deadline is not None:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
        text = "".join(output)
        if returncode != 0:
            raise RuntimeError(f"{name} failed (exit {returncode}):\n{text[-4000:]}")
        return text

    def elapsed(self) -> str:
        seconds = time.monotonic() - self.start
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"

    def done(self, path: pathlib.Path, what: str) -> bool:
        if path.exists():
            self.log(f"[reuse] {what}: {path}")
            return True
        return False

    # ---- steps ----
    def generate(self) -> None:
        from data_tools import synthetic

        raw = self.out / "raw"
        marker = raw / ".complete"
        if self.done(marker, "synthetic scenes"):
            return
        self.log(f"generating {self.c.train_count} + {self.c.val_count} synthetic scenes in {raw}")
        for split, count, seed in (("train", self.c.train_count, self.c.seed), ("val", self.c.val_count, 1000)):
            synthetic.generate(str(raw), split, count, self.c.height, self.c.width, seed=seed)
        marker.write_text("done\n")

    def convert(self) -> None:
        for split in ("train", "val"):
            if not self.done(self.out / "tfrecords" / f"{split}.json", f"{split} TFRecords"):
                self.cli(
                    "crn-convert",
                    "data_tools.convert",
                    "cityscapes",
                    f"--input={self.out / 'raw'}",
                    f"--output_dir={self.out / 'tfrecords'}",
                    f"--split={split}",
                    "--num_shards=2",
                    "--noprogress",
                )

    def train_segmenter(self) -> pathlib.Path:
        """The small segmenter (crn_tf/segmenter.py) trained on the training scenes, as a SavedModel."""
        export = self.out / "segmenter"
        if not self.done(export / "saved_model.pb", "segmenter"):
            self.log(f"[demo {self.elapsed()}] training the segmenter that scores the photos")
            self.cli(
                "crn-segmenter",
                "crn_tf.segmenter",
                f"--data_dir={self.out / 'tfrecords'}",
                f"--export_dir={export}",
                f"--steps={self.c.segmenter_steps}",
                f"--seed={self.c.seed}",
            )
        return export

    def plan(self) -> dict:
        path = self.out / PLAN_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def train(self, name: str, loss: str, steps: int, budget_seconds: float | None = None) -> int:
        """Trains model `name` to `steps` steps (or until `budget_seconds` pass); returns the steps reached."""
        model_dir = self.out / "models" / name
        done = latest_step(model_dir)
        if done >= steps:
            self.log(f"[reuse] {name}-loss model at step {done}: {model_dir}")
            self.trained.setdefault(name, {"steps": done, "reused": True})
            return done
        deadline = None
        note = f"up to {steps} steps"
        if budget_seconds is not None:
            deadline = time.monotonic() + budget_seconds
            note += f" or {budget_seconds / 60:.1f} min, whichever comes first"
        self.log(f"[demo {self.elapsed()}] training the {name}-loss model: {note}")
        t0 = time.monotonic()
        # crn-train resumes a model_dir: an interrupted run continues from its last checkpoint.
        self.cli(
            "crn-train",
            "crn_tf.train",
            f"--preset={self.c.preset}",
            f"--data_dir={self.out / 'tfrecords'}",
            f"--model_dir={model_dir}",
            f"--steps={steps}",
            f"--batch_size={self.c.batch_size}",
            f"--learning_rate={self.c.learning_rate}",
            f"--loss={loss}",
            f"--vgg_weights={self.c.vgg_weights}",
            f"--checkpoint_every={max(1, self.c.steps // 4)}",
            f"--image_every={max(1, self.c.steps // 4)}",
            f"--summary_every={max(1, self.c.steps // 50)}",
            f"--seed={self.c.seed}",
            deadline=deadline,
        )
        reached = latest_step(model_dir)
        self.trained[name] = {
            "steps": reached,
            "seconds": round(time.monotonic() - t0, 1),
            "stopped_by_budget": reached < steps,
        }
        return reached

    def evaluate(self, name: str) -> dict:
        path = self.out / "models" / name / "eval_val.json"
        if not self.done(path, f"evaluation of {name}"):
            self.cli(
                "crn-eval",
                "crn_tf.evaluate",
                f"--model_dir={self.out / 'models' / name}",
                f"--data_dir={self.out / 'tfrecords'}",
                "--split=val",
                f"--batch_size={self.c.batch_size}",
                f"--vgg_weights={self.c.vgg_weights}",
                "--perceptual_weights=uniform",
                "--baseline",
                f"--segmenter={self.out / 'segmenter'}",
                "--noprogress",
            )
        return json.loads(path.read_text())

    def export(self) -> pathlib.Path:
        base = self.out / "export" / "crn"
        if not (base.exists() and any(p.name.isdigit() for p in base.iterdir())):
            self.cli(
                "crn-export",
                "export.export_saved_model",
                f"--model_dir={self.out / 'models' / 'perceptual'}",
                f"--export_base={base}",
            )
        else:
            self.log(f"[reuse] SavedModel export: {base}")
        return base

    def synthesize(self, export_base: pathlib.Path) -> None:
        val_layouts = sorted((self.out / "raw" / "gtFine" / "val").rglob("*_gtFine_color.png"))
        jobs = [
            ("val", [str(p) for p in val_layouts], []),
            ("examples", [str(EXAMPLES)], [f"--resize={self.c.height}x{self.c.width}"]),
        ]
        for name, inputs, extra in jobs:
            target = self.out / "synthesized" / name
            if self.done(target, f"synthesized {name} layouts"):
                continue
            self.cli(
                "crn-synthesize",
                "crn_tf.synthesize",
                f"--saved_model={export_base}",
                f"--layouts={','.join(inputs)}",
                f"--output_dir={target}",
                "--grid",
                *extra,
            )

    # ---- report ----
    def what_ran(self, plan: dict) -> str:
        """One sentence on the training the budget allowed."""
        text = f"{plan['steps']} steps of batch {self.c.batch_size} per model"
        first = plan.get("perceptual", {})
        if first.get("stopped_by_budget"):
            text += (
                f" (of at most {plan['max_steps']}: the perceptual-loss training used its share of the "
                f"{plan['budget_minutes']:g}-minute budget, {first['seconds'] / 60:.1f} min, and was stopped there)"
            )
        return text

    def report(self, results: dict, plan: dict) -> pathlib.Path:
        from crn_tf.vgg import describe_weights

        rows = [
            ("CRN, perceptual loss (eq. 1)", results["perceptual"]["rows"]["model"]),
            ("same CRN, image-space loss (eq. 4)", results["image"]["rows"]["model"]),
            ("per-class mean colour", results["perceptual"]["rows"]["baseline_class_mean_colour"]),
        ]
        metric_names = ["l1", "psnr", "ssim", "perceptual"]
        table = "".join(
            "<tr><td>"
            + html.escape(label)
            + "</td>"
            + "".join(f"<td>{row[m]:.3f}</td>" for m in metric_names)
            + "</tr>"
            for label, row in rows
        )
        curves = {
            name: read_scalars(self.out / "models" / name / "train", "loss/total") for name in ("perceptual", "image")
        }
        images = []
        for name in ("perceptual", "image"):
            samples = sorted((self.out / "models" / name / "samples").glob("*.png"))
            if samples:
                step = samples[-1].stem[5:].lstrip("0")
                images.append(
                    (f"{name} loss: validation layouts at step {step} (layout | synthesized | reference)", samples[-1])
                )
        for folder in ("val", "examples"):
            for png in sorted((self.out / "synthesized" / folder).glob("*.png"))[:4]:
                images.append((f"{folder}: {png.name}", png))
        figures = "".join(
            f'<figure><img src="{html.escape(os.path.relpath(p, self.out))}">'
            f"<figcaption>{html.escape(t)}</figcaption></figure>"
            for t, p in images
        )
        segmentation = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{100 * row['miou']:.1f}</td>"
            f"<td>{100 * row['pixel_accuracy']:.1f}</td></tr>"
            for label, row in segmentation_rows(results)
        )
        mapping = results["perceptual"]["segmentation"]["segmenter"]["label_mapping"]
        svg = "".join(f"<h3>{name} loss</h3>{svg_curve(points)}" for name, points in curves.items())
        commands = "\n".join(html.escape(c) for c in self.commands) or "(every step reused)"
        page = f"""<!doctype html><meta charset="utf-8"><title>crn_tf demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{image-rendering:pixelated;max-width:100%}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}figure{{margin:1em 0}}</style>
<h1>crn_tf demo</h1>
<p>Preset <b>{self.c.preset}</b> ({self.c.height}x{self.c.width}), {html.escape(self.what_ran(plan))}, on
{self.c.train_count} synthetic scenes; evaluated on {self.c.val_count} validation scenes.</p>
<p>{html.escape(describe_weights(self.c.vgg_weights))}</p>
<h2>Validation</h2><table><tr><th></th><th>L1 &darr;</th><th>PSNR &uarr;</th><th>SSIM &uarr;</th>
<th>VGG distance &darr;</th></tr>{table}</table>
<p>VGG distance: eq. 1 with uniform layer weights and the VGG-19 weights above.</p>
<p>{html.escape(loss_comparison_caveat(self.c.vgg_weights))}</p>
<h2>Segmentation scores</h2>
<p>How well a small segmenter, trained on the {self.c.train_count} training scenes
({self.c.segmenter_steps} steps, <code>crn-segmenter</code>), recognises the layout in each image
(crn-eval --segmenter; void pixels excluded). The real photos are the ceiling.</p>
<table><tr><th></th><th>mIoU (%) &uarr;</th><th>pixel accuracy (%) &uarr;</th></tr>{segmentation}</table>
<p>{html.escape(mapping)}</p>
<h2>Loss curves</h2>{svg}
<h2>Images (layout | synthesized | reference where there is one)</h2>{figures}
<h2>Commands run</h2><pre>{commands}</pre>"""
        path = self.out / "report.html"
        path.write_text(page)
        return path

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        from crn_tf.vgg import describe_weights

        self.log(describe_weights(self.c.vgg_weights))
        self.generate()
        self.convert()
        self.train_segmenter()  # before the CRNs: the budget they get is what is left after it
        plan = self.plan()
        if plan:
            steps = plan["steps"]
            self.log(f"[reuse] plan: {steps} steps per model ({self.out / PLAN_FILE})")
            self.train("perceptual", "perceptual", steps)  # reused, or an interrupted run finished
        else:
            budget = None
            if self.c.budget_minutes:
                left = self.c.budget_minutes * 60 - (time.monotonic() - self.start)
                budget = max(30.0, TRAIN_SHARE * left)
            steps = self.train("perceptual", "perceptual", self.c.steps, budget)
            if steps < 1:
                raise RuntimeError("the perceptual-loss training reached no checkpoint within the budget")
            plan = {"steps": steps, "max_steps": self.c.steps, "budget_minutes": self.c.budget_minutes}
            plan.update(perceptual=self.trained["perceptual"])
            (self.out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        self.train("image", "image", steps)
        self.log(f"[demo {self.elapsed()}] evaluating, exporting, synthesizing")
        results = {name: self.evaluate(name) for name in ("perceptual", "image")}
        export_base = self.export()
        self.synthesize(export_base)
        report = self.report(results, self.plan())
        perceptual, image = (results[n]["rows"]["model"] for n in ("perceptual", "image"))
        baseline = results["perceptual"]["rows"]["baseline_class_mean_colour"]
        summary = {
            "vgg_weights": self.c.vgg_weights,
            "steps": steps,
            "max_steps": self.c.steps,
            "budget_minutes": self.c.budget_minutes,
            "training": self.what_ran(self.plan()),
            "perceptual_model": {k: perceptual[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "image_loss_model": {k: image[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "class_mean_colour_baseline": {k: baseline[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "beats_class_mean_colour_on_l1": perceptual["l1"] < baseline["l1"],
            "segmentation": {
                key: {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"]}
                for key, (_, row) in zip(SEGMENTATION_KEYS, segmentation_rows(results))
            },
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log("")
        self.log(f"trained: {self.what_ran(self.plan())}")
        self.log(
            f"VGG distance (lower is better): perceptual-loss CRN {perceptual['perceptual']:.3f} vs image-loss CRN "
            f"{image['perceptual']:.3f}; L1: CRN {perceptual['l1']:.2f} vs per-class mean colour {baseline['l1']:.2f}"
        )
        self.log(loss_comparison_caveat(self.c.vgg_weights))
        self.log(
            "segmenter mIoU / pixel accuracy (%): "
            + "; ".join(
                f"{label} {100 * row['miou']:.1f} / {100 * row['pixel_accuracy']:.1f}"
                for label, row in segmentation_rows(results)
            )
        )
        self.log(f"done in {self.elapsed()}. Outputs:")
        for what, path in [
            ("report", report),
            ("summary", self.out / "summary.json"),
            ("TFRecords", self.out / "tfrecords"),
            ("models (checkpoints, samples/, TensorBoard train/, eval_val.json/.md)", self.out / "models"),
            ("segmenter (SavedModel)", self.out / "segmenter"),
            ("TF Serving model base", export_base),
            ("synthesized images", self.out / "synthesized"),
        ]:
            self.log(f"  {what}: {path}")
        return summary


SEGMENTATION_KEYS = ("real_photos", "perceptual_model", "image_loss_model", "class_mean_colour_baseline")


def segmentation_rows(results: dict) -> list[tuple[str, dict]]:
    """(label, crn-eval row) for the segmentation table: real photos, both CRNs, the baseline."""
    return [
        ("real photos (ceiling)", results["perceptual"]["rows"]["real_photos"]),
        ("CRN, perceptual loss (eq. 1)", results["perceptual"]["rows"]["model"]),
        ("same CRN, image-space loss (eq. 4)", results["image"]["rows"]["model"]),
        ("per-class mean colour", results["perceptual"]["rows"]["baseline_class_mean_colour"]),
    ]


def read_scalars(logdir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar written by crn-train."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    points = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    points[int(event.step)] = float(tf.make_ndarray(value.tensor))
    return sorted(points.items())


def svg_curve(points: list[tuple[int, float]], width: int = 640, height: int = 200) -> str:
    """A dependency-free line plot (inline SVG) of a loss curve."""
    if len(points) < 2:
        return "<p>(not enough points)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 40

    def sx(x):
        return pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)

    def sy(y):
        return height - pad + (y0 - y) / max(y1 - y0, 1e-9) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg width="{width}" height="{height}" style="border:1px solid #ccc">'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>'
        f'<text x="{pad}" y="{pad - 8}" font-size="12">{y1:.3g}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="12">{y0:.3g} (step {x0} .. {x1})</text></svg>'
    )


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps per model, at most")
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=DemoConfig.budget_minutes,
        help="wall-clock budget of the whole run; the perceptual training stops early to fit it (0: no budget)",
    )
    parser.add_argument("--vgg_weights", default=os.environ.get("VGG_WEIGHTS", "none"))
    args = parser.parse_args(argv)
    config = DemoConfig(
        output_dir=args.output_dir, steps=args.steps, budget_minutes=args.budget_minutes, vgg_weights=args.vgg_weights
    )
    Demo(config).run()


if __name__ == "__main__":
    main()
