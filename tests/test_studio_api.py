"""crn-studio's TF-Serving-compatible REST API, through a real uvicorn on a free 127.0.0.1 port.

One tiny diverse (k=2) model is exported once per module; the studio serving it is the reference the
predictions are compared with (the SavedModel called directly), and it also plays TF Serving for the
--serving_url proxy test.
"""

import base64
import concurrent.futures
import io
import json
import os
import pathlib
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from conftest import b64, png_bytes, random_ids
from PIL import Image

from crn_tf import labels
from crn_tf.config import get_preset
from crn_tf.model import build_model
from crn_tf.studio.server import BackgroundServer, create_app
from export.saved_model import export_saved_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples/layouts/cityscapes_256p_00100027.png"  # 256x512 colour layout
SPACE = labels.get_label_space("cityscapes")
MAX_REQUEST_BYTES = 256 * 1024
MAX_PIXELS = 2 * 256 * 512


def call(url: str, body=None, raw: bytes | None = None, headers=None) -> tuple[int, dict]:
    """GET (or POST a JSON body / raw bytes) -> (status, JSON answer)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    tf.keras.utils.set_random_seed(3)
    base = tmp_path_factory.mktemp("studio_api") / "crn"
    export_saved_model(build_model(get_preset("tiny", num_outputs=2)), str(base))
    return base


@pytest.fixture(scope="module")
def signatures(export_base):
    """The export's signatures, called directly (the reference for the server's answers)."""
    loaded = tf.saved_model.load(str(export_base / "1"))
    yield loaded.signatures


@pytest.fixture(scope="module")
def server(export_base):
    app = create_app(str(export_base), max_request_bytes=MAX_REQUEST_BYTES, max_pixels=MAX_PIXELS, debug_routes=True)
    with BackgroundServer(app) as url:
        yield url


def test_status_and_metadata(server):
    status, body = call(f"{server}/v1/models/crn")
    assert status == 200
    assert body == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert call(f"{server}/v1/models/crn/versions/1")[0] == 200

    status, body = call(f"{server}/v1/models/crn/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "crn", "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    default, png = defs["serving_default"], defs["synthesize_png"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["label_ids"]["dtype"] == "DT_UINT8"
    assert [d["size"] for d in default["inputs"]["label_ids"]["tensor_shape"]["dim"]] == ["-1", "-1", "-1"]
    assert sorted(default["outputs"]) == ["image", "images"]
    assert png["inputs"]["label_png_bytes"]["dtype"] == "DT_STRING"
    assert list(png["outputs"]) == ["image_png_bytes"]

    status, body = call(f"{server}/v1/models/crn/versions/7/metadata")
    assert status == 404 and "Specific(crn, 7)" in body["error"]
    status, body = call(f"{server}/v1/models/other")
    assert status == 404 and "other" in body["error"]


def test_page_config_and_samples(server):
    status, config = call(f"{server}/studio/config")
    assert status == 200
    assert config["model"] == {
        "name": "crn",
        "version": 1,
        "preset": "tiny",
        "native_size": [16, 32],
        "size_multiple": 4,
        "num_outputs": 2,
    }
    assert config["predict_url"] == "/v1/models/crn:predict"
    classes = config["label_space"]["classes"]
    assert [c["name"] for c in classes] == list(SPACE.class_names)
    assert [tuple(c["color"]) for c in classes] == list(SPACE.palette)
    assert config["label_space"]["void"] == {"id": 255, "color": [0, 0, 0]}
    assert len(config["samples"]) == len(list((ROOT / "examples/layouts").glob("*.png")))
    with urllib.request.urlopen(server + config["samples"][0]["url"], timeout=10) as response:
        assert response.headers["content-type"] == "image/png"
        assert labels.decode_label_image(response.read(), SPACE).shape == (256, 512)
    for page in ("/", "/static/studio.js", "/static/raster.js", "/static/studio.css"):
        with urllib.request.urlopen(server + page, timeout=10) as response:
            assert response.status == 200 and response.read()


def assert_within_one_level(got: np.ndarray, want: np.ndarray) -> None:
    """The server's photo and the SavedModel's, computed by two calls of the same function: the float
    results may differ in the last bits (multi-threaded kernels are not bit-deterministic), which can
    move a value across a rounding boundary, so uint8 photos agree within 1 grey level."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1


def assert_same_photo(got_png: bytes, want_png: bytes) -> None:
    assert_within_one_level(*(np.asarray(Image.open(io.BytesIO(p))) for p in (got_png, want_png)))


def test_predict_png_gives_the_saved_models_bytes(server, signatures):
    sample = SAMPLE.read_bytes()
    ids_png = png_bytes(random_ids((16, 32), seed=1))  # single-channel ids, another size in the same request
    status, body = call(
        f"{server}/v1/models/crn:predict",
        {"signature_name": "synthesize_png", "instances": [{"label_png_bytes": b64(sample)}, b64(ids_png)]},
    )
    assert status == 200, body
    expected = signatures["synthesize_png"](label_png_bytes=tf.constant([sample, ids_png]))["image_png_bytes"].numpy()
    got = [base64.b64decode(p["b64"]) for p in body["predictions"]]  # a single named output: bare values
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_same_photo(a, b)
    assert Image.open(io.BytesIO(got[0])).size == (512, 256)

    # Columnar form, version-specific URL.
    status, body = call(
        f"{server}/v1/models/crn/versions/1:predict",
        {"signature_name": "synthesize_png", "inputs": {"label_png_bytes": [b64(ids_png)]}},
    )
    assert status == 200
    assert_same_photo(base64.b64decode(body["outputs"][0]["b64"]), expected[1])


def test_predict_ids_rows_and_columns(server, signatures):
    ids = np.stack([random_ids((16, 32), seed=s) for s in (2, 3)])  # [2, 16, 32]
    expected = {k: v.numpy() for k, v in signatures["serving_default"](label_ids=tf.constant(ids)).items()}
    assert expected["images"].shape == (2, 2, 16, 32, 3)

    status, body = call(f"{server}/v1/models/crn:predict", {"inputs": {"label_ids": ids.tolist()}})
    assert status == 200, body
    assert sorted(body["outputs"]) == ["image", "images"]  # several outputs: a dict of batches
    for name, want in expected.items():
        assert_within_one_level(np.array(body["outputs"][name], np.uint8), want)

    status, body = call(
        f"{server}/v1/models/crn:predict", {"instances": [ids[0].tolist(), {"label_ids": ids[1].tolist()}]}
    )
    assert status == 200, body
    for i, prediction in enumerate(body["predictions"]):  # several outputs: one dict per instance
        for name, want in expected.items():
            assert_within_one_level(np.array(prediction[name], np.uint8), want[i])

    status, last = call(f"{server}/studio/debug/last_request")
    assert status == 200 and last["signature_name"] == "serving_default"
    got = np.frombuffer(base64.b64decode(last["layouts"][1]["label_ids_b64"]), np.uint8).reshape(16, 32)
    np.testing.assert_array_equal(got, ids[1])


def _corrupt_png() -> bytes:
    data = bytearray(png_bytes(random_ids((16, 32), seed=4)))
    data[40:60] = b"\x00" * 20  # the IDAT stream: header intact, data broken
    return bytes(data)


def _big_png() -> bytes:
    return png_bytes(np.zeros((1024, 1024), np.uint8))  # a few KB, a million pixels


BAD_REQUESTS = [
    # (what, body or raw bytes, status, words in the error)
    ("not JSON", b"{instances: 1", 400, "not JSON"),
    ("no instances", {"signature_name": "synthesize_png"}, 400, "Missing 'inputs' or 'instances'"),
    ("unknown signature", {"signature_name": "classify", "instances": [1]}, 400, "classify"),
    ("non-PNG", {"signature_name": "synthesize_png", "instances": [b64(b"GIF89a....")]}, 400, "not a PNG"),
    ("bad base64", {"signature_name": "synthesize_png", "instances": [{"b64": "!!"}]}, 400, "base64"),
    (
        "PNG of a wrong size",
        {"signature_name": "synthesize_png", "instances": [b64(png_bytes(np.zeros((18, 32), np.uint8)))]},
        400,
        "layout 0 is 18x32: CRN 'tiny' needs height and width that are positive multiples of 4",
    ),
    ("ids of a wrong size", {"inputs": {"label_ids": np.zeros((1, 16, 30), int).tolist()}}, 400, "16x30"),
    ("ids out of range", {"inputs": {"label_ids": np.full((1, 16, 32), 300).tolist()}}, 400, "0..255"),
    ("ids not integers", {"inputs": {"label_ids": np.full((1, 16, 32), 0.5).tolist()}}, 400, "integers"),
    ("ragged ids", {"instances": [[[0, 1], [2]]]}, 400, "rectangular"),
    ("corrupt PNG", {"signature_name": "synthesize_png", "instances": [b64(_corrupt_png())]}, 400, ""),
    ("too many pixels", {"signature_name": "synthesize_png", "instances": [b64(_big_png())]}, 413, "--max_pixels"),
    ("body too large", b"x" * (MAX_REQUEST_BYTES + 1), 413, "--max_request_mb"),
]


@pytest.mark.parametrize("what,body,status,words", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, what, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got_status, answer = call(f"{server}/v1/models/crn:predict", None if raw else body, raw=raw)
    assert got_status == status, answer
    assert set(answer) == {"error"} and words in answer["error"] and answer["error"]
    ok_status, ok = call(
        f"{server}/v1/models/crn:predict", {"inputs": {"label_ids": np.zeros((1, 16, 32), int).tolist()}}
    )
    assert ok_status == 200 and np.array(ok["outputs"]["image"]).shape == (1, 16, 32, 3)


def test_streamed_body_over_the_cap_is_refused(server):
    """No Content-Length (chunked upload): the cap applies while reading."""

    def chunks():
        # Just over the cap: the client is done writing before the server answers 413 and closes
        # (a client still writing then could see a connection reset instead of the answer).
        for _ in range(4):
            yield b" " * (MAX_REQUEST_BYTES // 4)
        yield b" " * 16384

    request = urllib.request.Request(f"{server}/v1/models/crn:predict", data=chunks(), method="POST")
    request.add_header("Transfer-Encoding", "chunked")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 413 and "--max_request_mb" in json.loads(e.value.read())["error"]
    assert call(f"{server}/v1/models/crn")[0] == 200


def test_serving_url_forwards_to_tf_serving(server, export_base, signatures):
    """--serving_url: the studio checks requests and forwards them; here the upstream 'TF Serving' is the
    module's studio itself, which speaks the same REST API."""
    app = create_app(str(export_base), serving_url=f"{server}/v1/models/crn", max_pixels=MAX_PIXELS)
    with BackgroundServer(app) as proxy:
        assert call(f"{proxy}/studio/config")[1]["backend"] == "tf_serving"
        assert call(f"{proxy}/v1/models/crn")[1]["model_version_status"][0]["state"] == "AVAILABLE"
        assert (
            "synthesize_png" in call(f"{proxy}/v1/models/crn/metadata")[1]["metadata"]["signature_def"]["signature_def"]
        )
        sample = SAMPLE.read_bytes()
        status, body = call(
            f"{proxy}/v1/models/crn:predict", {"signature_name": "synthesize_png", "instances": [b64(sample)]}
        )
        expected = signatures["synthesize_png"](label_png_bytes=tf.constant([sample]))["image_png_bytes"].numpy()[0]
        assert status == 200
        assert_same_photo(base64.b64decode(body["predictions"][0]["b64"]), expected)
        status, body = call(
            f"{proxy}/v1/models/crn:predict", {"signature_name": "synthesize_png", "instances": [b64(b"x")]}
        )
        assert status == 400 and "not a PNG" in body["error"]  # checked here, not forwarded
        status, body = call(
            f"{proxy}/v1/models/crn:predict", {"signature_name": "synthesize_png", "instances": [b64(_corrupt_png())]}
        )
        assert status == 400 and body["error"]  # upstream's InvalidArgument, relayed

    app = create_app(str(export_base), serving_url="http://127.0.0.1:9/v1/models/crn", timeout_s=5)
    with BackgroundServer(app) as proxy:
        status, body = call(f"{proxy}/v1/models/crn")
        assert status == 502 and "did not answer" in body["error"]


def test_cli_serves_on_localhost(export_base):
    """`python -m crn_tf.studio --port=0`: binds 127.0.0.1 by default, prints the URL, answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "crn_tf.studio", f"--saved_model={export_base}", "--port=0"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            line = proc.stdout.readline()
            lines.append(line)
            match = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
            url = match and match[1]
        assert url, "".join(lines)
        assert call(f"{url}/v1/models/crn")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_arguments_are_clear_errors(tmp_path, export_base):
    with pytest.raises(ValueError, match="no numbered SavedModel version"):
        create_app(str(tmp_path / "crn"))
    with pytest.raises(ValueError, match="expected http://HOST:PORT/v1/models/NAME"):
        create_app(str(export_base), serving_url="localhost:8501")


def test_batcher_merges_concurrent_requests_and_isolates_failures():
    """crn_tf.studio.batching with a stand-in model (the integration is tested below)."""
    import threading

    from crn_tf.studio import rest
    from crn_tf.studio.batching import Batcher, BatchingOptions

    calls = []
    gate = threading.Event()

    def run(request):
        gate.wait(10)  # the first call holds the worker until the others have queued
        ids = request.inputs.get("label_ids")
        if ids is None:
            pngs = request.inputs["label_png_bytes"]
            if b"bad" in list(pngs):
                raise ValueError("bad PNG")
            calls.append(("png", len(pngs)))
            return {"image_png_bytes": np.array([p + b"!" for p in pngs], object)}
        calls.append(("ids", ids.shape))
        return {"image": ids.astype(np.int32)[..., None] * 2}

    batcher = Batcher(run, BatchingOptions(max_batch_size=4, batch_timeout_s=0.05))
    requests = [rest.PredictRequest("serving_default", {"label_ids": np.full((1, 4, 8), 1, np.uint8)}, True)]
    requests += [
        rest.PredictRequest("serving_default", {"label_ids": np.full((n, 4, 8), 10 + n, np.uint8)}, True)
        for n in (1, 2, 1, 1)
    ]
    requests += [rest.PredictRequest("serving_default", {"label_ids": np.full((1, 8, 8), 7, np.uint8)}, True)]
    requests += [
        rest.PredictRequest("synthesize_png", {"label_png_bytes": np.array([p], object)}, True)
        for p in (b"a", b"bad", b"c")
    ]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(batcher.run, requests[0])]
        time.sleep(0.1)  # the first request is in the model; the others queue behind it
        futures += [pool.submit(batcher.run, r) for r in requests[1:]]
        time.sleep(0.1)
        gate.set()
        results = []
        for f in futures:
            try:
                results.append(f.result(10))
            except ValueError as e:
                results.append(e)
    batcher.close()
    for request, result in zip(requests, results):
        if "label_ids" in request.inputs:
            np.testing.assert_array_equal(result["image"][..., 0], request.inputs["label_ids"].astype(np.int32) * 2)
    assert [list(r["image_png_bytes"]) if isinstance(r, dict) else str(r) for r in results[-3:]] == [
        [b"a!"],
        "bad PNG",
        [b"c!"],
    ]
    # 1 alone, then the four 4x8 requests of 1, 2, 1 (= 4 layouts) and 1 layout, the 8x8 one alone, and
    # the PNGs: merged (fails), then one by one.
    assert calls[0] == ("ids", (1, 4, 8)) and ("ids", (4, 4, 8)) in calls and ("ids", (1, 8, 8)) in calls
    assert batcher.calls == len(calls) < len(requests)


def test_studio_with_batching_gives_each_request_its_own_answer(export_base, signatures):
    from crn_tf.studio.batching import BatchingOptions

    app = create_app(str(export_base), batching=BatchingOptions(max_batch_size=8, batch_timeout_s=0.05))
    ids = [random_ids((1, 16, 32), seed=s) for s in range(8)]
    bad = {"signature_name": "synthesize_png", "instances": [b64(_corrupt_png())]}
    with BackgroundServer(app) as url:
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            answers = [
                pool.submit(call, f"{url}/v1/models/crn:predict", {"inputs": {"label_ids": i.tolist()}}) for i in ids
            ]
            bad_answer = pool.submit(call, f"{url}/v1/models/crn:predict", bad)
            answers = [a.result() for a in answers]
        assert bad_answer.result()[0] == 400
    for layout, (status, body) in zip(ids, answers):
        assert status == 200, body
        expected = signatures["serving_default"](label_ids=tf.constant(layout))["image"].numpy()
        # A batched call may pick other CPU kernels than a single one: round-off flips a rounding at most.
        np.testing.assert_allclose(np.array(body["outputs"]["image"]), expected, atol=1)
    assert app.state.backend.batcher.calls < len(ids)
    with pytest.raises(ValueError, match="TF Serving has its own --enable_batching"):
        create_app(str(export_base), serving_url="http://127.0.0.1:9/v1/models/crn", batching=BatchingOptions())
