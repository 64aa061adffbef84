"""`make demo`: the whole job end to end on data it generates, with the project's own commands.

    python -m crn_tf.demo --output_dir=demo_output   # at most ~13 min on 2 CPU cores (make demo adds the .venv)

1. generates synthetic street scenes in the Cityscapes layout (train + val),
2. converts them to TFRecords (crn-convert), and trains a small segmentation network on the
   training scenes, exported as a SavedModel (crn-segmenter), to score synthesized photos with,
3. trains the `demo` preset with the perceptual loss for up to --steps steps or until its share of
   the time budget (--budget_minutes) is spent, whichever comes first (crn-train saves and stops on
   SIGTERM), then the same architecture for the same number of steps with the image-space loss of
   eq. 4 as a baseline (crn-train); every command's output, progress bars included, is shown live.
   Both start from the weights shipped in crn_tf/demo_weights/ (trained longer on the same generated
   scenes by benchmarks/train_demo_weights.py, the same way for both losses; checked against this
   preset, size, scenes and VGG-19 weights) and train on at 1e-5 for up to 200 steps; --from_scratch
   trains both from zero (1e-3, up to 400 steps), as does --vgg_weights other than none,
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
# The weights both CRNs start from (benchmarks/train_demo_weights.py made them; --from_scratch: none).
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "demo_weights"
WEIGHTS_FORMAT = 1
MODEL_NAMES = ("perceptual", "image")  # model_dir names = crn-train's --loss
FROM_SCRATCH_STEPS = 400  # the demo's steps (at most) with --from_scratch
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
    # At most; fewer if the perceptual training's share of the budget runs out first. From the shipped
    # weights (trained longer already) the demo trains on for 200 steps; from zero (--from_scratch), 400.
    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-3
    vgg_weights: str = "none"
    seed: int = 0
    segmenter_steps: int = 400  # ~45 s at 64x128 on 2 cores; trained before the CRNs, inside the budget
    # Wall-clock budget of the whole run in minutes (0 = none). The perceptual-loss training gets
    # TRAIN_SHARE of what is left when it starts; the rest (the image-loss baseline, which needs no
    # VGG-19 and so runs ~3x faster, evaluation, export, synthesis) fits in the remainder.
    budget_minutes: float = 13.0
    # Where both CRNs start: a folder of {perceptual,image}.npz (save_start_weights; the default: the ones
    # shipped in crn_tf/demo_weights/, trained longer on the same generated scenes), or None: from zero
    # (--from_scratch). From shipped weights the demo trains on at finetune_learning_rate: a fresh Adam at
    # 1e-4 (the rate the shipped weights ended at) moved L1 from 21.67 to 22.35 in 200 steps (per-class mean
    # colour: 22.43; one run), at 1e-5 to 22.07 (three runs, README).
    start_weights: str | None = str(WEIGHTS_DIR)
    finetune_learning_rate: float = 1e-5


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
    "400-step runs from zero the perceptual-loss CRN's VGG distance was 0.28 and 0.05 lower and 0.37 and 0.13 "
    "higher than the image-loss CRN's, while two runs of the same command differ by ~0.3, and the shipped starting "
    "weights of the two losses, trained the same 1500 steps, score alike. The table shows the pipeline works, not "
    "which loss is better; that needs the ImageNet weights (VGG_WEIGHTS=imagenet make demo) and longer training."
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


# ---- starting weights: {perceptual,image}.npz, float16 arrays by variable path + a "__meta__" JSON ----
def start_weights_key(config: DemoConfig, loss: str) -> dict:
    """What a starting-weights file must have been trained for to start this demo's `loss` model."""
    from crn_tf.config import get_preset

    return {
        "format": WEIGHTS_FORMAT,
        "loss": loss,
        "crn_config": get_preset(config.preset).to_dict(),
        "size": [config.height, config.width],
        "train_scenes": {"count": config.train_count, "seed": config.seed},
        "vgg_weights": config.vgg_weights,
    }


def _variables(model) -> dict:
    """A CRN's variables by their path inside the model (`module_4x8/conv1/kernel`)."""
    return {w.path.split("/", 1)[1]: w for w in model.weights}


def _built_model(crn_config, height: int, width: int):
    import numpy as np

    from crn_tf.model import CascadedRefinementNetwork

    model = CascadedRefinementNetwork(crn_config)
    model(np.zeros((1, height, width, crn_config.input_channels), np.float32))
    return model


def save_start_weights(model_dir: str, path: str, meta: dict) -> None:
    """Writes the generator of model_dir's newest checkpoint as float16 arrays + `meta` to `path` (.npz),
    atomically. `meta` must hold start_weights_key's fields (checked when the demo reads it)."""
    import io

    import numpy as np

    from crn_tf import fileio
    from crn_tf.model_dir import load_model

    model = load_model(model_dir)
    arrays = {name: np.asarray(w.numpy(), np.float16) for name, w in _variables(model).items()}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # weights barely compress: stored, not deflated
    fileio.atomic_write(path, buffer.getvalue())


def read_start_weights(path: pathlib.Path, config: DemoConfig, loss: str) -> tuple[dict, dict]:
    """(arrays, meta) of a starting-weights file, checked against this demo's preset, size, scenes, VGG-19
    weights and loss. Errors name the file and the way out (--from_scratch)."""
    import zipfile

    import numpy as np

    way_out = "run with --from_scratch to train from zero, or remake it with benchmarks/train_demo_weights.py"
    if not path.is_file():
        raise ValueError(f"{path}: starting weights not found; {way_out}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable starting-weights file ({e}); {way_out}") from e
    wrong = [
        f"{key} {meta.get(key)!r} (this demo: {value!r})"
        for key, value in start_weights_key(config, loss).items()
        if meta.get(key) != value
    ]
    if wrong:
        raise ValueError(f"{path} was trained for another demo: {'; '.join(wrong)}; {way_out}")
    return arrays, meta


def write_start_model_dir(arrays: dict, config: DemoConfig, model_dir: pathlib.Path, source: pathlib.Path) -> None:
    """A model_dir (config + checkpoint) holding `arrays`, for crn-train's --init_from; written in a
    temporary folder, then renamed. Every variable of the preset must be there with its shape."""
    import numpy as np

    from crn_tf import fileio
    from crn_tf.config import get_preset
    from crn_tf.model_dir import save_model_dir

    model = _built_model(get_preset(config.preset), config.height, config.width)
    variables = _variables(model)
    missing = sorted(set(variables) - set(arrays))
    extra = sorted(set(arrays) - set(variables))
    shapes = [
        f"{name} {arrays[name].shape} (preset: {tuple(w.shape)})"
        for name, w in variables.items()
        if name in arrays and arrays[name].shape != tuple(w.shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"{source} does not fit preset {config.preset}: missing {missing}, unexpected {extra}, other shapes "
            f"{shapes}; run with --from_scratch, or remake it with benchmarks/train_demo_weights.py"
        )
    for name, w in variables.items():
        w.assign(np.asarray(arrays[name], np.float32))
    tmp = fileio.temporary_name(str(model_dir))
    save_model_dir(model, tmp)
    fileio.replace_directory(tmp, str(model_dir))


class Demo:
    def __init__(self, config: DemoConfig, log=print):
        self.c = config
        self.out = pathlib.Path(config.output_dir).resolve()
        self.log = log
        self.commands: list[str] = []
        self.start = time.monotonic()
        self.trained: dict[str, dict] = {}  # per model: steps, seconds, whether the budget stopped it
        self.start_meta: dict | None = None  # the starting weights' record (None: from zero)

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

    def prepare_start(self) -> None:
        """Says where both CRNs start (the demo's first line); from shipped weights, checks them against this
        demo (preset, size, scenes, VGG-19 weights) and writes them as model_dirs start/<name> for --init_from."""
        if not self.c.start_weights:
            self.log(f"crn_tf demo: both CRNs train {self.describe_start()}.")
            return
        read = {}
        for name in MODEL_NAMES:
            source = pathlib.Path(self.c.start_weights) / f"{name}.npz"
            read[name] = (source, *read_start_weights(source, self.c, name))
        self.start_meta = read["perceptual"][2]
        self.log(
            f"crn_tf demo: both CRNs START FROM WEIGHTS SHIPPED IN {self.c.start_weights} "
            f"({self.start_meta['trained']}) and train on here; --from_scratch trains them from zero."
        )
        for name, (source, arrays, _) in read.items():
            target = self.out / "start" / name
            if not self.done(target / "crn_config.json", f"starting weights of the {name}-loss model"):
                write_start_model_dir(arrays, self.c, target, source)

    def describe_start(self) -> str:
        """Where the models started, for the report and summary.json."""
        if not self.c.start_weights:
            if self.c.vgg_weights != "none":  # the shipped weights were trained with the random VGG-19
                return f"from zero (--vgg_weights={self.c.vgg_weights}: no shipped weights for it)"
            return "from zero (--from_scratch)"
        m = self.start_meta
        return (
            f"from the weights shipped in {self.c.start_weights} ({m['trained']}; made by `{m['command']}`), "
            f"then trained on here at learning rate {self.c.finetune_learning_rate:g}"
        )

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
        start = []
        learning_rate = self.c.learning_rate
        if self.c.start_weights:
            start = [f"--init_from={self.out / 'start' / name}"]
            learning_rate = self.c.finetune_learning_rate
            note += ", from the shipped weights"
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
            f"--learning_rate={learning_rate}",
            f"--loss={loss}",
            f"--vgg_weights={self.c.vgg_weights}",
            f"--checkpoint_every={max(1, self.c.steps // 4)}",
            f"--image_every={max(1, self.c.steps // 4)}",
            f"--summary_every={max(1, self.c.steps // 50)}",
            f"--seed={self.c.seed}",
            *start,
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
{self.c.train_count} synthetic scenes; evaluated on {self.c.val_count} validation scenes. Both CRNs started
{html.escape(self.describe_start())}.</p>
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
        self.prepare_start()  # the first line, before TensorFlow's start-up lines: where both CRNs start
        from crn_tf import fileio
        from crn_tf.vgg import describe_weights

        self.log(describe_weights(self.c.vgg_weights))
        self.generate()
        self.convert()
        self.train_segmenter()  # before the CRNs: the budget they get is what is left after it
        plan = self.plan()
        if plan and plan.get("start") != self.describe_start():
            raise ValueError(
                f"{self.out / PLAN_FILE}: this output_dir's models started {plan.get('start', 'from zero')}, not "
                f"{self.describe_start()}; use another --output_dir"
            )
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
            plan.update(start=self.describe_start())
            plan.update(perceptual=self.trained["perceptual"])
            fileio.atomic_write(str(self.out / PLAN_FILE), json.dumps(plan, indent=2) + "\n")
        self.train("image", "image", steps)
        self.log(f"[demo {self.elapsed()}] evaluating, exporting, synthesizing")
        results = {name: self.evaluate(name) for name in ("perceptual", "image")}
        export_base = self.export()
        self.synthesize(export_base)
        report = self.report(results, self.plan())
        perceptual, image = (results[n]["rows"]["model"] for n in ("perceptual", "image"))
        baseline = results["perceptual"]["rows"]["baseline_class_mean_colour"]
        beats = beats_baseline(perceptual, baseline)
        summary = {
            "start": self.describe_start(),
            "vgg_weights": self.c.vgg_weights,
            "steps": steps,
            "max_steps": self.c.steps,
            "budget_minutes": self.c.budget_minutes,
            "training": self.what_ran(self.plan()),
            "perceptual_model": {k: perceptual[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "image_loss_model": {k: image[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            "class_mean_colour_baseline": {k: baseline[k] for k in ("l1", "psnr", "ssim", "perceptual")},
            # The perceptual-loss CRN against painting each class its mean colour.
            "beats_class_mean_colour_on_l1": beats["L1"],
            "beats_class_mean_colour_on_vgg_distance": beats["VGG distance"],
            "beats_class_mean_colour_on_miou": beats["mIoU"],
            "segmentation": {
                key: {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"]}
                for key, (_, row) in zip(SEGMENTATION_KEYS, segmentation_rows(results))
            },
        }
        fileio.atomic_write(str(self.out / "summary.json"), json.dumps(summary, indent=2) + "\n")
        self.log("")
        self.log(f"started {self.describe_start()}")
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
        self.log("")
        self.log(self.in_short(beats, steps))
        return summary

    def in_short(self, beats: dict, steps: int) -> str:
        """The last line: in one sentence, what was seen and what to run next."""
        won = [m for m, ok in beats.items() if ok]
        lost = [m for m, ok in beats.items() if not ok]
        verdict = f"beat painting each class its mean colour on {' and '.join(won)}" if won else ""
        if lost:
            verdict += (" but not on " if won else "did not beat painting each class its mean colour on ") + (
                " and ".join(lost)
            )
        start = "starting from the shipped weights and " if self.start_meta else ""
        return (
            f"In short: a {self.c.preset}-preset CRN, {start}trained {steps} steps here on generated street scenes, "
            f"turned {self.c.val_count} unseen layouts into photos that {verdict} (report.html shows them); next, "
            "train one on your own data (README, 'Workflows': crn-convert, crn-train) or synthesize with the "
            "authors' Cityscapes model: crn-import-original --download=cityscapes_256p "
            "--model_dir=models/cityscapes_256p, then crn-synthesize --model_dir=models/cityscapes_256p "
            "--layouts=examples/layouts --output_dir=photos."
        )


def beats_baseline(model: dict, baseline: dict) -> dict:
    """Whether a crn-eval model row beats the per-class mean colour row: lower L1 and VGG distance, higher mIoU."""
    return {
        "L1": model["l1"] < baseline["l1"],
        "VGG distance": model["perceptual"] < baseline["perceptual"],
        "mIoU": model["miou"] > baseline["miou"],
    }


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


def parse_config(argv=None) -> DemoConfig:
    """The demo's command line as a DemoConfig."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per model, at most (default: {DemoConfig.steps} from the shipped weights, "
        f"{FROM_SCRATCH_STEPS} from scratch)",
    )
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=DemoConfig.budget_minutes,
        help="wall-clock budget of the whole run; the perceptual training stops early to fit it (0: no budget)",
    )
    parser.add_argument("--vgg_weights", default=os.environ.get("VGG_WEIGHTS", "none"))
    parser.add_argument(
        "--from_scratch",
        action="store_true",
        help=f"train both CRNs from zero, not from the weights shipped in {WEIGHTS_DIR} (implied by --vgg_weights "
        "other than none: those weights were trained with the random VGG-19)",
    )
    args = parser.parse_args(argv)
    start = None if args.from_scratch or args.vgg_weights != "none" else DemoConfig.start_weights
    steps = args.steps if args.steps is not None else DemoConfig.steps if start else FROM_SCRATCH_STEPS
    return DemoConfig(
        output_dir=args.output_dir,
        steps=steps,
        budget_minutes=args.budget_minutes,
        vgg_weights=args.vgg_weights,
        start_weights=start,
    )


def main(argv=None) -> None:
    config = parse_config(argv)
    try:
        Demo(config).run()
    except ValueError as e:  # starting weights that do not fit, a plan.json of another start: a message
        sys.exit(f"crn_tf.demo: {e}")


if __name__ == "__main__":
    main()
