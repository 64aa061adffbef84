"""Seconds per training step of two MultiWorkerMirroredStrategy workers on localhost, before and after
"each gradient crosses the workers once" (issue 14), in one run.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/multi_worker.py   # ~5 min on 2 CPU cores

The model has the paper's widths: by default the cityscapes_256p preset's five 1024-wide modules
(86M of its 98M parameters, k=1) on 16x32 images, global batch 2 (one image per worker), so that
moving the 344 MB gradient between the two processes (gRPC over localhost, TF's collectives) is a
large part of the step. `--modules=7 --size=64x128` runs the whole preset.

"before" is crn_tf/train.py as of `--before_rev` (its replica step all-reduced the gradients, then
Keras' optimizer all-reduced them again), loaded from `git show` as a second module; "after" is this
checkout's. Both Trainers live in the same two worker processes (same seed, same data), each gets
one warm-up step (tracing), then their steps alternate (before, after, before, ...) so that load
from other jobs on a shared machine hits both alike; the chief's medians are reported.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("preset", "cityscapes_256p", "Model preset whose widths are used.")
flags.DEFINE_integer("modules", 5, "Use the preset's first (coarsest) this many modules.")
flags.DEFINE_string("size", "16x32", "Image size HxW (a multiple of 2^(modules-1)).")
flags.DEFINE_integer("steps", 4, "Timed steps per variant and round (after one warm-up step).")
flags.DEFINE_string("before_rev", "b1c28aa", "Git revision of the 'before' crn_tf/train.py.")
flags.DEFINE_integer("timeout", 600, "Seconds one variant may take.")
FLAGS = flags.FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = """
import dataclasses, importlib.util, json, os, sys, time
workers, index, model_dir, preset, modules, size, steps, before_path = sys.argv[1:9]
cluster = {"worker": workers.split(",")}
os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": int(index)}})
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from crn_tf import train as after
from crn_tf.config import get_preset, parse_size
spec = importlib.util.spec_from_file_location("train_before", before_path)
before = sys.modules["train_before"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(before)
base = get_preset(preset, num_outputs=1)
config = dataclasses.replace(base, widths=base.widths[: int(modules)])
h, w = parse_size(size, "--size")
rng = np.random.default_rng(0)
layout = tf.one_hot(rng.integers(0, 20, [2, h, w]), 20)
batch = {"layout": layout, "image": tf.constant(rng.uniform(0, 255, [2, h, w, 3]), tf.float32)}
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = tf.data.Dataset.from_tensors(batch).repeat().with_options(options)
runs, losses = {}, {}
for name, module in (("before", before), ("after", after)):
    train_config = module.TrainConfig(batch_size=2, vgg_weights="none")
    trainer = module.Trainer(config, train_config, f"{model_dir}/{name}", strategy=strategy, log=lambda *a, **k: None)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    # `before` may be a checkout from before the public step method
    step = trainer.train_step if hasattr(trainer, "train_step") else trainer._build_step()
    def run(step=step, iterator=iterator):
        out = step(iterator)
        terms = out[0] if isinstance(out, tuple) else out  # after: (terms, finite, applied); before: terms
        return float(terms["total"])
    runs[name] = run
    losses[name] = [run()]  # trace + warm-up
seconds = {"before": [], "after": []}
for _ in range(int(steps)):
    for name in ("before", "after"):
        start = time.perf_counter()
        losses[name].append(runs[name]())
        seconds[name].append(time.perf_counter() - start)
params = sum(int(np.prod(v.shape)) for v in trainer.model.trainable_variables)
print("RESULT " + json.dumps({"index": int(index), "seconds": seconds, "params": params, "losses": losses}))
"""


def before_train_py(directory: str) -> str:
    """crn_tf/train.py as of --before_rev, written to `directory`; returns its path."""
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{FLAGS.before_rev}:crn_tf/train.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = pathlib.Path(directory, "train_before.py")
    path.write_text(old)
    return str(path)


def run_workers(before_path: str, scratch: str) -> dict:
    """Two workers; the chief's result."""
    from crn_tf.distribution import localhost_workers

    workers = ",".join(localhost_workers(2))
    script = pathlib.Path(scratch, "worker.py")
    script.write_text(WORKER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    args = [f"{scratch}/model_dirs", FLAGS.preset, str(FLAGS.modules), FLAGS.size, str(FLAGS.steps), before_path]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), workers, str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=FLAGS.timeout)[0])
    finally:
        for p in processes:
            p.kill()
    results = []
    for p, out in zip(processes, outputs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{out[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results[0]


def main(argv):
    del argv
    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        result = run_workers(before_train_py(scratch), scratch)
    print(f"chief: {json.dumps(result)}")
    params = result["params"]
    print(
        f"\n2 localhost workers, MultiWorkerMirroredStrategy, {FLAGS.preset} widths, first {FLAGS.modules} modules "
        f"({params / 1e6:.1f}M parameters, {params * 4 / 1e6:.0f} MB of float32 gradient), {FLAGS.size}, "
        f"global batch 2, Adam; CPU cores: {os.cpu_count()}\n"
    )
    print("| variant | gradient all-reduced per step | median s/step | timed steps (s), alternating |")
    print("|---|---|---|---|")
    medians = {}
    for name in ("before", "after"):
        seconds = result["seconds"][name]
        medians[name] = float(np.median(seconds))
        traffic = f"{(2 if name == 'before' else 1) * params * 4 / 1e6:.0f} MB"
        times = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"| {name} | {traffic} | {medians[name]:.2f} | {times} |")
    ratio = medians["after"] / medians["before"]
    print(f"\nafter / before: {ratio:.2f} ({medians['before']:.2f} -> {medians['after']:.2f} s/step)")


if __name__ == "__main__":
    app.run(main)
