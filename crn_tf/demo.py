"""`make demo`: the whole job end to end on data it generates, with the project's own commands.

    python -m crn_tf.demo --output_dir=demo_output   # ~10 min on 2 CPU cores (make demo adds the .venv)

1. generates synthetic street scenes in the Cityscapes layout (train + val),
2. converts them to TFRecords (crn-convert),
3. trains the `demo` preset with the perceptual loss, and the same architecture for the same steps
   with the image-space loss of eq. 4 as a baseline (crn-train),
4. evaluates both on val, with the per-class mean colour baseline (crn-eval),
5. exports the perceptual model for TF Serving and verifies the export (crn-export),
6. synthesizes the val layouts and the real layouts in examples/layouts (crn-synthesize),
7. writes report.html (grids, loss curves, the comparison table) and summary.json.

Every step is skipped when its output exists, so a second run reuses what is done. Without
ImageNet VGG-19 weights (the default here: nothing is downloaded) the "perceptual" loss uses a
seeded random VGG-19: the pipeline is the real one, the images are far from the paper's.
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
import subprocess
import sys
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
    steps: int = 400
    batch_size: int = 4
    learning_rate: float = 1e-3
    vgg_weights: str = "none"
    seed: int = 0


class Demo:
    def __init__(self, config: DemoConfig, log=print):
        self.c = config
        self.out = pathlib.Path(config.output_dir).resolve()
        self.log = log
        self.commands: list[str] = []

    # ---- helpers ----
    def cli(self, name: str, module: str, *args: str) -> str:
        """Runs a console script (from this interpreter's bin/ if installed, else `python -m`)."""
        script = shutil.which(name, path=os.path.dirname(sys.executable))
        argv = [script] if script else [sys.executable, "-m", module]
        shown = " ".join([name, *args])
        self.commands.append(shown)
        self.log(f"$ {shown}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        result = subprocess.run([*argv, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [line for line in result.stdout.splitlines() if line.strip() and not TF_NOISE.match(line)]
        for line in lines[-6:]:
            self.log(f"  {line[-200:]}")
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{result.stdout[-4000:]}")
        return result.stdout

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

    def train(self, name: str, loss: str) -> None:
        # crn-train resumes a model_dir: a finished run returns at once, an interrupted one continues.
        self.cli(
            "crn-train",
            "crn_tf.train",
            f"--preset={self.c.preset}",
            f"--data_dir={self.out / 'tfrecords'}",
            f"--model_dir={self.out / 'models' / name}",
            f"--steps={self.c.steps}",
            f"--batch_size={self.c.batch_size}",
            f"--learning_rate={self.c.learning_rate}",
            f"--loss={loss}",
            f"--vgg_weights={self.c.vgg_weights}",
            f"--checkpoint_every={max(1, self.c.steps // 4)}",
            f"--image_every={max(1, self.c.steps // 4)}",
            f"--summary_every={max(1, self.c.steps // 50)}",
            f"--seed={self.c.seed}",
        )

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
    def report(self, results: dict) -> pathlib.Path:
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
        svg = "".join(f"<h3>{name} loss</h3>{svg_curve(points)}" for name, points in curves.items())
        commands = "\n".join(html.escape(c) for c in self.commands) or "(every step reused)"
        page = f"""<!doctype html><meta charset="utf-8"><title>crn_tf demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{image-rendering:pixelated;max-width:100%}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}figure{{margin:1em 0}}</style>
<h1>crn_tf demo</h1>
<p>Preset <b>{self.c.preset}</b> ({self.c.height}x{self.c.width}), {self.c.steps} steps of batch {self.c.batch_size} on
{self.c.train_count} synthetic scenes; evaluated on {self.c.val_count} validation scenes.</p>
<p>{html.escape(describe_weights(self.c.vgg_weights))}</p>
<h2>Validation</h2><table><tr><th></th><th>L1 &darr;</th><th>PSNR &uarr;</th><th>SSIM &uarr;</th>
<th>VGG distance &darr;</th></tr>{table}</table>
<p>VGG distance: eq. 1 with uniform layer weights and the VGG-19 weights above.</p>
<h2>Loss curves</h2>{svg}
<h2>Images (layout | synthesized | reference where there is one)</h2>{figures}
<h2>Commands run</h2><pre>{commands}</pre>"""
        path = self.out / "report.html"
        path.write_text(page)
        return path

    def run(self) -> dict:
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        from crn_tf.vgg import describe_weights

        self.log(describe_weights(self.c.vgg_weights))
        self.generate()
        self.convert()
        self.train("perceptual", "perceptual")
        self.train("image", "image")
        results = {name: self.evaluate(name) for name in ("perceptual", "image")}
        export_base = self.export()
        self.synthesize(export_base)
        report = self.report(results)
        perceptual, image = (results[n]["rows"]["model"] for n in ("perceptual", "image"))
        baseline = results["perceptual"]["rows"]["baseline_class_mean_colour"]
        summary = {
            "vgg_weights": self.c.vgg_weights,
            "steps": self.c.steps,
            "perceptual_model": {k: perceptual[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "image_loss_model": {k: image[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "class_mean_colour_baseline": {k: baseline[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "beats_image_loss_on_vgg_distance": perceptual["perceptual"] < image["perceptual"],
            "beats_class_mean_colour_on_l1": perceptual["l1"] < baseline["l1"],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log("")
        self.log(
            f"VGG distance (lower is better): perceptual-loss CRN {perceptual['perceptual']:.3f} vs image-loss CRN "
            f"{image['perceptual']:.3f}; L1: CRN {perceptual['l1']:.2f} vs per-class mean colour {baseline['l1']:.2f}"
        )
        self.log(f"done in {time.perf_counter() - start:.0f}s. Outputs:")
        for what, path in [
            ("report", report),
            ("summary", self.out / "summary.json"),
            ("TFRecords", self.out / "tfrecords"),
            ("models (checkpoints, samples/, TensorBoard train/)", self.out / "models"),
            ("TF Serving model base", export_base),
            ("synthesized images", self.out / "synthesized"),
        ]:
            self.log(f"  {what}: {path}")
        return summary


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
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--vgg_weights", default=os.environ.get("VGG_WEIGHTS", "none"))
    args = parser.parse_args(argv)
    Demo(DemoConfig(output_dir=args.output_dir, steps=args.steps, vgg_weights=args.vgg_weights)).run()


if __name__ == "__main__":
    main()
