"""crn_tf's training step on the JAX backend, jit-compiled, with in-memory batches: no TensorFlow.

    python benchmarks/gpu_step.py                                    # the paper's networks, all rows (GPU)
    python benchmarks/gpu_step.py --sizes=256x512 --precisions=mixed_bfloat16 --batches=1
    python benchmarks/gpu_step.py --preset=tiny --sizes=16x32 --steps=2 --warmup=1   # CPU smoke run, seconds

Runs crn_tf's own CascadedRefinementNetwork, VGG-19 (random weights: the same cost as ImageNet's;
nothing is downloaded) and perceptual loss (CRNLoss, the released 512p layer weights) in one
`jax.jit` step: the reference's VGG features outside the gradient, value and gradient through
`model.stateless_call`, Adam 1e-4 through `optimizer.stateless_apply`. Per size (the cityscapes
preset with that many modules, k = 1; `--preset` for another network), precision and batch size it
prints seconds per step (median of `--steps` after `--warmup`), images/s, the device's peak memory
(`memory_stats()['peak_bytes_in_use']`: since the process started, so each size and precision runs in
its own process and its batches in increasing order), the step's FLOPs (XLA's cost analysis of the
compiled step) and their share of the device's peak FLOP/s (`--peak_tflops`, or the table below
for known devices: dense bfloat16 tensor-core peaks; float32 rows are compared with the same peak).

For the GPU machine with JAX but no TensorFlow: bring the keras, namex and optree wheels, set
XLA_PYTHON_CLIENT_PREALLOCATE=false, and run this file from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bfloat16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by jax's device_kind.
PEAK_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A100-SXM4-80GB": 312.0}
PRESET_BY_SIZE = {(256, 512): "cityscapes_256p", (512, 1024): "cityscapes_512p", (1024, 2048): "cityscapes_1024p"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256x512,512x1024,1024x2048", help="HxW, comma-separated")
    p.add_argument("--precisions", default="float32,mixed_bfloat16", help="Keras dtype policies")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (increasing)")
    p.add_argument("--preset", default=None, help="a crn_tf preset for every size (default: the paper's by size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--remat", action="store_true", help="recompute modules and VGG blocks in the backward pass")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, for the share column")
    p.add_argument("--json_out", default=None, help="also write the rows as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # size,precision: one process's rows
    return p.parse_args(argv)


def config_for(size: tuple[int, int], preset: str | None):
    from crn_tf.config import PRESETS, get_preset

    name = preset or PRESET_BY_SIZE.get(size)
    if name is None:
        raise SystemExit(f"--sizes: no paper preset for {size[0]}x{size[1]}; pass --preset (one of {sorted(PRESETS)})")
    config = dataclasses.replace(get_preset(name), num_outputs=1)
    if size[0] % config.size_multiple or size[1] % config.size_multiple:
        raise SystemExit(f"--sizes: {size[0]}x{size[1]} is not a multiple of {name}'s {config.size_multiple}")
    return config


def run_rows(args, size: tuple[int, int], precision: str) -> list[dict]:
    """Times every batch size for one size and precision, in this process."""
    import jax
    import keras
    import numpy as np
    from keras import ops

    from crn_tf.api import one_hot
    from crn_tf.config import LAYER_WEIGHTS_512P
    from crn_tf.losses import CRNLoss
    from crn_tf.model import build_model
    from crn_tf.vgg import VGGFeatures

    keras.mixed_precision.set_dtype_policy(precision)
    config = config_for(size, args.preset)
    model = build_model(config)
    vgg = VGGFeatures(weights="none")
    model.remat = vgg.remat = args.remat
    loss = CRNLoss("perceptual", layer_weights=LAYER_WEIGHTS_512P, feature_extractor=vgg)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    def mean_loss(trainable, non_trainable, layout, image, real_features):
        fake, non_trainable = model.stateless_call(trainable, non_trainable, layout, training=True)
        return ops.mean(loss(image, fake, layout, real_features=real_features)["total"]), non_trainable

    value_and_grad = jax.value_and_grad(mean_loss, has_aux=True)

    def step(trainable, non_trainable, optimizer_state, vgg_weights, layout, image):
        # VGG-19's frozen weights are arguments (a StatelessScope maps its variables to them), not
        # constants closed over by the traced function: 20M parameters as constants slow compilation.
        with keras.StatelessScope(state_mapping=list(zip(vgg.weights, vgg_weights))):
            real_features = [jax.lax.stop_gradient(f) for f in loss.features(image)]  # no gradient needed
            (value, non_trainable), grads = value_and_grad(trainable, non_trainable, layout, image, real_features)
        trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, grads, trainable)
        return value, trainable, non_trainable, optimizer_state

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    vgg_weights = [v.value for v in vgg.weights]
    device = jax.local_devices()[0]
    peak = args.peak_tflops or PEAK_TFLOPS.get(device.device_kind)
    rows = []
    # The step donates its state: each row goes on from the last one's (the model's variables are stale).
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        layout = jax.device_put(one_hot(rng.integers(0, config.num_classes, (batch, *size)), config.num_classes))
        image = jax.device_put(rng.uniform(0, 255, (batch, *size, 3)).astype("float32"))
        row = {"size": f"{size[0]}x{size[1]}", "precision": precision, "batch": batch, "device": device.device_kind}
        try:
            compiled = jitted.lower(*state, vgg_weights, layout, image).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = float(cost.get("flops", 0.0)) if cost else 0.0
            times = []
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                value, *state = compiled(*state, vgg_weights, layout, image)
                value.block_until_ready()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            stats = device.memory_stats() or {}
            row |= {
                "s_per_step": seconds,
                "images_per_s": batch / seconds,
                "peak_memory_gb": stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None,
                "tflop_per_step": flops / 1e12,
                "share_of_peak": flops / seconds / (peak * 1e12) if peak and flops else None,
                "loss": float(value),
            }
        except Exception as e:  # out of memory on the device, most likely: the row says so, the rest go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['size']} | {r['precision']} | {r['batch']} | {r['error']} | | | | |"

    def f(value, spec):
        return "n/a" if value is None else format(value, spec)

    return (
        f"| {r['size']} | {r['precision']} | {r['batch']} | {r['s_per_step']:.4f} | {r['images_per_s']:.1f} | "
        f"{f(r['peak_memory_gb'], '.1f')} | {r['tflop_per_step']:.3g} | {f(r['share_of_peak'], '.0%')} |"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        size, precision = args.child.split(",")
        h, w = (int(x) for x in size.split("x"))
        rows = run_rows(args, (h, w), precision)
        for row in rows:
            row["tensorflow_imported"] = "tensorflow" in sys.modules  # the point: none on a JAX-only machine
        print("ROWS " + json.dumps(rows))
        return
    import jax

    print(f"backend: jax {jax.__version__} on {jax.local_devices()[0].device_kind}; remat {args.remat}")
    header = "| size | precision | batch | s/step | images/s | peak device memory (GB) | TFLOP/step | share of peak |"
    print(header + "\n|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--json_out")]
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            # One process per size and precision: the peak memory is the process's, and an out-of-memory
            # device starts clean for the next.
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *passthrough, f"--child={size},{precision}"],
                capture_output=True,
                text=True,
            )
            lines = [line for line in result.stdout.splitlines() if line.startswith("ROWS ")]
            if result.returncode != 0 or not lines:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
                child_rows = [
                    {"size": size, "precision": precision, "batch": "-", "error": f"exit {result.returncode}: {tail}"}
                ]
            else:
                child_rows = json.loads(lines[-1][5:])
            for r in child_rows:
                print(format_row(r), flush=True)
            rows += child_rows
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json_out)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
