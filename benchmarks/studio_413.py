"""crn-studio's cost of refusing an oversized request (413) so that ordinary clients read the answer.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/studio_413.py              # ~15 s on 2 cores
    PYTHONPATH=. python benchmarks/studio_413.py --requests=20 --body_mb=34

Exports the tiny preset (random weights; the export's TF1-loader check is skipped) and starts
`python -m crn_tf.studio` on it in a child process (default caps: --max_request_mb=32,
--max_pixels=1024*2048), so that the child's CPU time and memory are the server's alone. Then sends
--requests requests of each kind, one after another, from this process, and reads the child's
/proc/<pid>/stat (user + system CPU) and /proc/<pid>/status (VmRSS, VmHWM) around each kind:

- `Content-Length` over the cap (http.client): a 2048x2048 layout of label ids as JSON, padded with
  spaces to --body_mb MB. Answered 413 from its headers, the rest drained (lingering close).
- the same body chunked (http.client, `encode_chunked`): no length, refused by the pixel cap while it
  streams in (after 2M ids), the rest drained.
- a chunked body of spaces past the byte cap: buffered up to the cap (32 MiB) before its 413.
- `Expect: 100-continue` (curl, which sends it for large bodies): the 413 comes before any body.
- for reference, a small valid predict request (16x32 ids).

Prints, per kind: the client's median seconds per request, the server's CPU seconds per request,
and its RSS before and after and its peak (VmHWM, the process's high-water mark so far).
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("requests", 10, "requests of each kind")
flags.DEFINE_integer("body_mb", 34, "size of the oversized bodies, MB (10^6 bytes)")
FLAGS = flags.FLAGS
PREDICT = "/v1/models/crn:predict"


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _memory_mib(pid: int) -> dict[str, float]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}


def _post(port: int, body, chunked: bool = False) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", PREDICT, body, {"Content-Type": "application/json"}, encode_chunked=chunked)
        response = connection.getresponse()
        json.loads(response.read())
        return response.status
    finally:
        connection.close()


def _curl(port: int, path: str) -> int:
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json",
         "--data-binary", f"@{path}", f"http://127.0.0.1:{port}{PREDICT}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout)


def _chunks(data: bytes, size: int = 2**20):
    return (data[i : i + size] for i in range(0, len(data), size))


def main(argv):
    del argv
    import numpy as np

    from crn_tf.config import get_preset
    from crn_tf.model import build_model
    from export import saved_model as export_lib

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="studio_413_"))
    export_lib.verify_export = lambda export_dir, model: 0  # the TF1-loader check: not what is measured
    export_lib.export_saved_model(build_model(get_preset("tiny")), str(tmp / "crn"))
    ids = np.random.default_rng(0).integers(0, 19, (2048, 2048)).tolist()
    layout = json.dumps({"inputs": {"label_ids": [ids]}}).encode()
    size = FLAGS.body_mb * 10**6
    body = layout + b" " * (size - len(layout))
    spaces = b'{"inputs": {"label_ids": [[[0]]]}}' + b" " * size
    (tmp / "body.json").write_bytes(body)
    small = json.dumps({"inputs": {"label_ids": np.zeros((1, 16, 32), int).tolist()}}).encode()
    print(f"oversized bodies: {len(body) / 1e6:.1f} MB (the 2048x2048 ids: {len(layout) / 1e6:.1f} MB of it)")

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "crn_tf.studio", f"--saved_model={tmp / 'crn'}", "--port=0", "--verbosity=-1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        for line in server.stdout:
            if match := re.search(r"open http://127\.0\.0\.1:(\d+)/", line):
                port = int(match.group(1))
                break
        else:
            raise RuntimeError("crn-studio did not start")
        kinds = {
            "small valid request (200)": lambda: _post(port, small),
            "Content-Length over the cap": lambda: _post(port, body),
            "chunked, refused by the pixel cap mid-stream": lambda: _post(port, _chunks(body), chunked=True),
            "chunked spaces, refused at the byte cap": lambda: _post(port, _chunks(spaces), chunked=True),
        }
        if shutil.which("curl"):
            kinds["Expect: 100-continue (curl)"] = lambda: _curl(port, str(tmp / "body.json"))
        for _ in range(3):
            kinds["small valid request (200)"]()  # warm
        print("| request | client saw | client s / request (median) | server CPU s / request | server RSS MiB |")
        print("|---|---|---|---|---|")
        for name, send in kinds.items():
            memory_before, cpu_before = _memory_mib(server.pid), _cpu_seconds(server.pid)
            seconds, statuses = [], set()
            for _ in range(FLAGS.requests):
                start = time.perf_counter()
                try:
                    statuses.add(str(send()))
                except OSError as e:  # what a client saw before the lingering close: a reset, a broken pipe
                    statuses.add(type(e).__name__)
                seconds.append(time.perf_counter() - start)
            time.sleep(0.2)  # the server's last close
            cpu = (_cpu_seconds(server.pid) - cpu_before) / FLAGS.requests
            memory = _memory_mib(server.pid)
            print(
                f"| {name} | {'/'.join(sorted(statuses))} | {statistics.median(seconds):.3f} | {cpu:.3f} "
                f"| {memory_before['VmRSS']:.0f} -> {memory['VmRSS']:.0f} (peak so far {memory['VmHWM']:.0f}) |"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
