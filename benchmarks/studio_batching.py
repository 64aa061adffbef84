"""crn-studio throughput with and without server-side batching (`--enable_batching`), concurrent clients.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/studio_batching.py              # ~1-2 min on 2 cores
    PYTHONPATH=. python benchmarks/studio_batching.py --preset=tiny --size=256x512 --clients=8

Exports a random-weight model of --preset (crn-export's export_saved_model, TF1-loader check included),
then serves it with crn-studio (uvicorn on a free 127.0.0.1 port, in this process) twice: without
batching, and with BatchingOptions(--max_batch_size, --batch_timeout_ms). Each time --clients threads
send --requests predict requests each, one layout per request, as fast as they get answers: label ids
(`serving_default`, JSON) and layout PNGs (`synthesize_png`, in a second round). Reports requests/s over
the whole round and the median latency per request, and the model calls the batcher made. The clients
run in this process too (they share its 2 cores with the server): the figures are for comparing the
two modes, not absolute.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import statistics
import tempfile
import time
import urllib.request

from absl import app, flags

flags.DEFINE_string("preset", "demo", "model preset (random weights)")
flags.DEFINE_string("size", None, "HxW of the layouts (default: the preset's native size)")
flags.DEFINE_integer("clients", 8, "concurrent client threads")
flags.DEFINE_integer("requests", 12, "requests per client and round")
flags.DEFINE_integer("max_batch_size", 8, "BatchingOptions.max_batch_size")
flags.DEFINE_float("batch_timeout_ms", 2.0, "BatchingOptions.batch_timeout_s, in ms")
FLAGS = flags.FLAGS


def _post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200
        response.read()
    return time.perf_counter() - start


def _round(url: str, bodies: list[bytes]) -> tuple[float, float]:
    """(requests/s, median latency s) of --clients threads sending --requests bodies each."""

    def client(i: int) -> list[float]:
        return [_post(url, bodies[(i + r) % len(bodies)]) for r in range(FLAGS.requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(FLAGS.clients) as pool:
        latencies = [t for ts in pool.map(client, range(FLAGS.clients)) for t in ts]
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies)


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from crn_tf.config import get_preset, parse_size
    from crn_tf.model import build_model
    from crn_tf.png import encode_png
    from crn_tf.studio.batching import BatchingOptions
    from crn_tf.studio.server import BackgroundServer, create_app
    from export.saved_model import export_saved_model

    config = get_preset(FLAGS.preset, num_outputs=1)
    h, w = parse_size(FLAGS.size) if FLAGS.size else config.native_size
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    layouts = [rng.integers(0, config.num_classes, (h, w)).astype(np.uint8) for _ in range(4)]

    def png(ids) -> str:
        return base64.b64encode(encode_png(ids)).decode()

    bodies = {
        "serving_default (ids)": [json.dumps({"inputs": {"label_ids": [ids.tolist()]}}).encode() for ids in layouts],
        "synthesize_png": [
            json.dumps({"signature_name": "synthesize_png", "instances": [{"b64": png(ids)}]}).encode()
            for ids in layouts
        ],
    }
    batching = BatchingOptions(FLAGS.max_batch_size, FLAGS.batch_timeout_ms / 1000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_saved_model(build_model(config), f"{tmp}/crn")
        for mode, options in (("off", None), ("on", batching)):
            studio = create_app(f"{tmp}/crn", batching=options, max_request_bytes=256 * 2**20, max_pixels=2**26)
            with BackgroundServer(studio) as url:
                for signature, signature_bodies in bodies.items():
                    _round(f"{url}/v1/models/crn:predict", signature_bodies[:1])  # warm-up (traces this size)
                    batcher = studio.state.backend.batcher
                    calls_before = batcher.calls if batcher else 0
                    rate, latency = _round(f"{url}/v1/models/crn:predict", signature_bodies)
                    calls = (batcher.calls - calls_before) if batcher else FLAGS.clients * FLAGS.requests
                    rows.append((signature, mode, rate, latency, calls))
                    print(
                        f"{signature}, batching {mode}: {rate:.1f} requests/s, median {latency * 1e3:.0f} ms",
                        flush=True,
                    )
            if studio.state.backend.batcher:
                studio.state.backend.batcher.close()

    n = FLAGS.clients * FLAGS.requests
    print(f"\n{FLAGS.preset} {h}x{w}, {FLAGS.clients} clients x {FLAGS.requests} requests of 1 layout")
    print("| signature | batching | requests/s | median latency | model calls |")
    print("|---|---|---|---|---|")
    for signature, mode, rate, latency, calls in rows:
        print(f"| {signature} | {mode} | {rate:.1f} | {latency * 1e3:.0f} ms | {calls} of {n} requests |")
    for signature in bodies:
        off, on = (r[2] for r in rows if r[0] == signature)
        print(f"{signature}: batching on / off throughput {on / off:.2f}")


if __name__ == "__main__":
    app.run(main)
