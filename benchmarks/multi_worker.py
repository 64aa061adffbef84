"""Seconds per training step of two MultiWorkerMirroredStrategy workers on localhost, before and after
"each gradient crosses the workers once" (issue 14), in one run.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/multi_worker.py   # ~5 min on 2 CPU cores

The model has the paper's widths: by default the cityscapes_256p preset's five 1024-wide modules
(86M of its 98M parameters, k=1) on 16x32 images, global batch 2 (one image per worker), so the
step is dominated by moving the 344 MB gradient between the two processes (gRPC over localhost,
TF's ring collectives), not by the convolutions. `--modules=7 --size=64x128` runs the whole preset.

"before" runs crn_tf/train.py as of `--before_rev` (its replica step all-reduced the gradients, then
Keras' optimizer all-reduced them again) from a temporary copy of the package; "after" runs this
checkout's. Both load the same model (same seed) and data; each variant gets fresh worker processes,
one warm-up step (tracing), then `--steps` timed steps; the chief's median is reported. The variants
alternate `--rounds` times so that changing load on a shared machine hits both.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("preset", "cityscapes_256p", "Model preset whose widths are used.")
flags.DEFINE_integer("modules", 5, "Use the preset's first (coarsest) this many modules.")
flags.DEFINE_string("size", "16x32", "Image size HxW (a multiple of 2^(modules-1)).")
flags.DEFINE_integer("steps", 4, "Timed steps per variant and round (after one warm-up step).")
flags.DEFINE_integer("rounds", 1, "How many times to run before, after.")
flags.DEFINE_string("before_rev", "b1c28aa", "Git revision of the 'before' crn_tf/train.py.")
flags.DEFINE_integer("timeout", 600, "Seconds one variant may take.")
FLAGS = flags.FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = """
import dataclasses, json, os, sys, time
workers, index, model_dir, preset, modules, size, steps = sys.argv[1:8]
cluster = {"worker": workers.split(",")}
os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": int(index)}})
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from crn_tf.config import get_preset, parse_size
from crn_tf.train import TrainConfig, Trainer
base = get_preset(preset, num_outputs=1)
config = dataclasses.replace(base, widths=base.widths[: int(modules)])
h, w = parse_size(size, "--size")
train_config = TrainConfig(batch_size=2, vgg_weights="none")
trainer = Trainer(config, train_config, model_dir, strategy=strategy, log=lambda *a, **k: None)
rng = np.random.default_rng(0)
layout = tf.one_hot(rng.integers(0, 20, [2, h, w]), 20)
batch = {"layout": layout, "image": tf.constant(rng.uniform(0, 255, [2, h, w, 3]), tf.float32)}
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = tf.data.Dataset.from_tensors(batch).repeat().with_options(options)
iterator = iter(strategy.experimental_distribute_dataset(dataset))
step = trainer._build_step()
def run():
    out = step(iterator)
    terms = out[0] if isinstance(out, tuple) else out  # after: (terms, finite, applied); before: terms
    return float(terms["total"])
start = time.perf_counter(); run(); warmup = time.perf_counter() - start
seconds = []
for _ in range(int(steps)):
    start = time.perf_counter(); loss = run(); seconds.append(time.perf_counter() - start)
params = sum(int(np.prod(v.shape)) for v in trainer.model.trainable_variables)
result = {"index": int(index), "seconds": seconds, "warmup": warmup, "params": params, "loss": loss}
print("RESULT " + json.dumps(result))
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def before_package(directory: str) -> str:
    """A copy of crn_tf with train.py as of --before_rev; returns the directory to put on PYTHONPATH."""
    shutil.copytree(ROOT / "crn_tf", f"{directory}/crn_tf", ignore=shutil.ignore_patterns("__pycache__"))
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{FLAGS.before_rev}:crn_tf/train.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pathlib.Path(directory, "crn_tf/train.py").write_text(old)
    return directory


def run_variant(code_root: str, scratch: str) -> dict:
    """Two workers with `code_root` first on PYTHONPATH; the chief's result."""
    workers = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    script = pathlib.Path(scratch, "worker.py")
    script.write_text(WORKER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=code_root)
    model_dir = tempfile.mkdtemp(dir=scratch)
    args = [model_dir, FLAGS.preset, str(FLAGS.modules), FLAGS.size, str(FLAGS.steps)]
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

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        before_root = before_package(f"{scratch}/before")
        for _ in range(FLAGS.rounds):
            for name, root in (("before", before_root), ("after", str(ROOT))):
                result = run_variant(root, scratch)
                rows.append((name, result))
                print(f"{name}: {result}", flush=True)
    params = rows[0][1]["params"]
    print(
        f"\n2 localhost workers, MultiWorkerMirroredStrategy, {FLAGS.preset} widths, first {FLAGS.modules} modules "
        f"({params / 1e6:.1f}M parameters, {params * 4 / 1e6:.0f} MB of float32 gradient), {FLAGS.size}, "
        f"global batch 2; CPU cores: {os.cpu_count()}\n"
    )
    print("| variant | gradient all-reduced per step | median s/step | timed steps (s) |")
    print("|---|---|---|---|")
    medians = {}
    for name, result in rows:
        median = float(np.median(result["seconds"]))
        medians.setdefault(name, []).append(median)
        times = ", ".join(f"{s:.2f}" for s in result["seconds"])
        traffic = f"{(2 if name == 'before' else 1) * params * 4 / 1e6:.0f} MB"
        print(f"| {name} | {traffic} | {median:.2f} | {times} |")
    before, after = np.median(medians["before"]), np.median(medians["after"])
    print(f"\nafter / before: {after / before:.2f} ({before:.2f} -> {after:.2f} s/step)")


if __name__ == "__main__":
    app.run(main)
