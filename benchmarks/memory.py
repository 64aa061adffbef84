"""Training and inference memory per image, estimated from the architecture, and measured.

    PYTHONPATH=. python benchmarks/memory.py                    # the presets table (instant)
    PYTHONPATH=. python benchmarks/memory.py --measure=cityscapes_512p --measure_size=256x512 [--remat]

Training without --remat keeps, per pixel of each module, the upsampled features, the layout, and
the six outputs of conv/norm/LeakyReLU x2 (d_prev + C + 6 d floats; conv1 is split, so there is no
concatenation), the synthesized images' VGG-19 activations (two tensors per conv) and the
reference's five loss features (computed outside the gradient tape). With --remat
(tf.recompute_grad per refinement module but the last, and per VGG-19 block) it keeps only each
module's layout and output (the last module's activations whole) and each VGG block's output and
loss feature, plus the working set of recomputing the largest module or block (its activations and
their gradients; VGG's backward pass ends before the generator's starts, so the larger of the two
working sets counts). Parameters count 16 bytes each (float32 weights, gradients and Adam's two
slots). Inference keeps only the largest module's working set.

`--measure` runs batch-1 training steps (VGG-19 weights `none`; by default a warm-up step that
traces the step function, then one more) in a fresh subprocess, `--runs` times (one process per
run, so nothing of an earlier one stays allocated), and prints per run the process's peak resident
memory (ru_maxrss), its growth over the process after importing TensorFlow, the peak of TensorFlow's
own CPU allocator (the tensors, oneDNN's scratchpads included: TensorFlow hands them out), each
step's seconds; then the spread over the runs. It names the host first: CPU model, cores, the
flags that decide oneDNN's kernels (avx2, avx512f, ...) and any ONEDNN_MAX_CPU_ISA cap.

    PYTHONPATH=. python benchmarks/memory.py --measure=cityscapes_1024p --remat --runs=3
    ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=. python benchmarks/memory.py --measure=cityscapes_1024p --remat --runs=3
"""

import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import host_description  # noqa: E402 - this folder's helper

flags.DEFINE_string("measure", None, "A preset to run a batch-1 training step of, to check the estimate.")
flags.DEFINE_string("measure_size", None, "HxW for --measure (default: the preset's native size).")
flags.DEFINE_integer("num_outputs", None, "Override the preset's k for --measure.")
flags.DEFINE_boolean("remat", False, "--measure with the trainer's --remat.")
flags.DEFINE_integer(
    "measure_steps",
    2,
    "Training steps per --measure run (the first one traces the step), each one's seconds reported.",
    lower_bound=1,
)
flags.DEFINE_integer("runs", 1, "--measure this many times, each in a fresh process (the spread).", lower_bound=1)
flags.DEFINE_integer(
    "inter_op_threads", 0, "--measure with the trainer's --inter_op_threads (0: its default).", lower_bound=0
)
FLAGS = flags.FLAGS

VGG19 = [(64, 0), (64, 0), (128, 1), (128, 1), (256, 2), (256, 2), (256, 2), (256, 2)]
VGG19 += [(512, 3)] * 4 + [(512, 4)] * 2  # (channels, pools before) up to conv5_2
VGG19_BLOCKS = ((64, 0, 2), (128, 1, 2), (256, 2, 4), (512, 3, 4), (512, 4, 2))  # (channels, pools, convs)
LOSS_FEATURES = ((64, 0), (128, 1), (256, 2), (512, 3), (512, 4))  # conv{1..5}_2


def generator_floats(config, h: int, w: int, remat: bool = False) -> tuple[float, float, float]:
    """(training activations kept, the extra working set of the backward pass through the modules,
    inference peak) in floats, for one image at h x w."""
    modules, prev = [], 0
    for i, width in enumerate(config.widths):
        scale = 2 ** (config.num_modules - 1 - i)
        pixels = (h // scale) * (w // scale)
        activations = pixels * (prev + config.input_channels + 6 * width)  # conv1 split: no concatenation
        gradients = 2 * pixels * max(prev, width)  # the gradients flowing through: ~two of its largest tensors
        output = pixels * (config.input_channels + width)  # its layout and output
        peak = pixels * (2 * prev + config.input_channels + 2 * width)  # inference: input, upsampled, two
        modules.append((activations, gradients, output, peak))
        prev = width
    inference = max(m[3] for m in modules)
    images = h * w * 3 * config.num_outputs
    if not remat:
        return sum(m[0] for m in modules) + images, 0.0, inference
    # remat keeps each module's layout and output and recomputes its activations in the backward pass;
    # all but the last module, which is kept whole (see CascadedRefinementNetwork.call) and whose
    # activations are freed before the earlier modules' backward passes recompute theirs.
    last = modules[-1]
    kept = sum(m[2] for m in modules[:-1]) + last[0] + images
    work = max([last[1]] + [m[0] + m[1] - last[0] for m in modules[:-1]])
    return kept, work, inference


def vgg_floats(h: int, w: int, remat: bool = False) -> tuple[float, float]:
    """(training activations kept, the largest block's recompute working set) of VGG-19 on one
    synthesized image, in floats."""
    if not remat:
        return sum(2 * c * (h // 2**p) * (w // 2**p) for c, p in VGG19), 0.0
    kept, largest = 0.0, 0.0
    for c, p, convs in VGG19_BLOCKS:
        pixels = (h // 2**p) * (w // 2**p)
        kept += (1 if convs == 2 else 2) * c * pixels  # the block's output and its loss feature
        largest = max(largest, (2 * convs + 2) * c * pixels)  # recomputing it, with its gradients
    return kept, largest


def estimate(config, h: int, w: int, remat: bool = False) -> dict:
    gen_kept, gen_work, gen_peak = generator_floats(config, h, w, remat)
    vgg_kept, vgg_work = vgg_floats(h, w, remat)
    reference = h * w * 3 + sum(c * (h // 2**p) * (w // 2**p) for c, p in LOSS_FEATURES)
    # The VGG-19 backward pass ends before the generator's begins: their working sets do not add up.
    train = gen_kept + vgg_kept * config.num_outputs + reference + max(gen_work, vgg_work * config.num_outputs)
    return {
        "train_gb": train * 4 / 2**30,
        "infer_gb": gen_peak * 4 / 2**30,
        "params_gb": config.num_parameters() * 16 / 2**30,
    }


MEASURE = """
import resource, sys, tempfile, time, numpy as np, tensorflow as tf
from crn_tf.config import get_preset
from crn_tf.train import Trainer, TrainConfig
name, k, remat = sys.argv[1], sys.argv[4], sys.argv[5] == "1"
h, w, steps, inter = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[6]), int(sys.argv[7]) or None
c = get_preset(name, **({"num_outputs": int(k)} if k != "-" else {}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tc = TrainConfig(batch_size=1, vgg_weights="none", remat=remat, inter_op_threads=inter)
with tempfile.TemporaryDirectory() as d:
    t = Trainer(c, tc, d, log=lambda *a, **k: None)
    layout = tf.one_hot(np.random.randint(0, 20, [1, h, w]), 20)
    batch = {"layout": layout, "image": tf.random.uniform([1, h, w, 3], 0, 255)}
    it = iter(t.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        float(t.train_step(it)[0]["total"])
        seconds.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tensors = tf.config.experimental.get_memory_info("CPU:0")["peak"]
print(peak / 2**20, (peak - before) / 2**20, tensors / 2**30, *seconds)
"""


# The CPU features that decide which oneDNN kernels (and so which scratchpads) TensorFlow's CPU ops use.
def main(argv):
    del argv
    from crn_tf.config import PRESETS

    print(
        "| preset | size | parameters | training activations / image | with --remat "
        "| + params, gradients, Adam | inference / image |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, config in PRESETS.items():
        h, w = config.native_size
        e, r = estimate(config, h, w), estimate(config, h, w, remat=True)
        print(
            f"| {name} | {h}x{w} | {config.num_parameters() / 1e6:.1f}M | {e['train_gb']:.2f} GB "
            f"| {r['train_gb']:.2f} GB | {e['params_gb']:.2f} GB | {e['infer_gb']:.2f} GB |"
        )
    if FLAGS.measure:
        from crn_tf.config import get_preset, parse_size

        if FLAGS.measure not in PRESETS:
            raise app.UsageError(f"--measure: unknown preset {FLAGS.measure!r}; expected one of {sorted(PRESETS)}")
        overrides = {"num_outputs": FLAGS.num_outputs} if FLAGS.num_outputs else {}
        config = get_preset(FLAGS.measure, **overrides)
        h, w = parse_size(FLAGS.measure_size, "--measure_size") if FLAGS.measure_size else config.native_size
        e = estimate(config, h, w, FLAGS.remat)
        k = str(FLAGS.num_outputs) if FLAGS.num_outputs else "-"
        args = [sys.executable, "-c", MEASURE, FLAGS.measure, str(h), str(w), k, str(int(FLAGS.remat))]
        args += [str(FLAGS.measure_steps), str(FLAGS.inter_op_threads)]
        print(f"\nhost: {host_description()}")
        print(f"{FLAGS.measure} (k={config.num_outputs}) at {h}x{w}, remat {FLAGS.remat}: estimated ", end="")
        print(f"{e['train_gb']:.2f} GB activations + {e['params_gb']:.2f} GB parameters, gradients, Adam ", end="")
        print(f"= {e['train_gb'] + e['params_gb']:.2f} GB")
        peaks = []
        for run in range(FLAGS.runs):
            begin = time.perf_counter()
            out = subprocess.run(args, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"--measure: the training step failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            wall = time.perf_counter() - begin
            peak, growth, tensors, *seconds = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
            peaks.append(peak)
            steps = " / ".join(f"{x:.0f}" for x in seconds)
            print(f"run {run + 1}: peak RSS {peak:.2f} GiB ({growth:.2f} over the process after importing ", end="")
            print(f"TensorFlow; TensorFlow's allocator peak {tensors:.2f} GiB); step seconds {steps} ", end="")
            print(f"(the first traces); process {wall:.0f} s")
        if len(peaks) > 1:
            spread = f"min {min(peaks):.2f}, median {statistics.median(peaks):.2f}, max {max(peaks):.2f}"
            print(f"peak RSS over {len(peaks)} runs: {spread} GiB")


if __name__ == "__main__":
    app.run(main)
