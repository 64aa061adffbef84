"""Steps in separate worker processes, timed in turn: what backends_step.py and step_ab.py share.

A worker is Python setup code that defines `trainer` (with `train_step(iterator)`) and `iterator`;
`start_worker` appends `STEP_LOOP`, which prints `ready`, then, per line read from stdin, runs one
training step and prints `{"seconds": ...}` as JSON. Alternating the workers step by step makes load
from other jobs hit all of them alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The worker's side of the protocol, run after its setup code.
STEP_LOOP = r"""
import json as _json, sys as _sys, time as _time
print("ready", flush=True)
for _line in _sys.stdin:
    _start = _time.perf_counter()
    float(trainer.train_step(iterator)[0]["total"])  # waits for the step's result
    print(_json.dumps({"seconds": _time.perf_counter() - _start}), flush=True)
"""


def start_worker(setup: str, args: list[str], env: dict, name: str, cwd: str | None = None) -> subprocess.Popen:
    """Starts the worker `setup` + STEP_LOOP with `args` in `env` and waits for its `ready` line."""
    process = subprocess.Popen(
        [sys.executable, "-c", setup + STEP_LOOP, *args], env={**os.environ, **env}, cwd=cwd,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    while (line := process.stdout.readline()) and line.strip() != "ready":
        pass
    if not line:
        raise SystemExit(f"the {name} worker died before it was ready (exit {process.wait()})")
    return process


def step(process: subprocess.Popen) -> float:
    """One step of a worker: its seconds."""
    process.stdin.write("step\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())["seconds"]


def alternate(workers: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """`warmup` untimed steps of each worker, then `steps` timed ones in turn; stops the workers.
    Returns each worker's step times."""
    try:
        for _ in range(warmup):
            for process in workers.values():
                step(process)
        times = {name: [] for name in workers}
        for _ in range(steps):
            for name, process in workers.items():
                times[name].append(step(process))
        return times
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait(60)
