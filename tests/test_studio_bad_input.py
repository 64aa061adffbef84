"""crn-studio under bad input: every client error is a 4xx with TF Serving's {"error": ...}, refused
cheaply, and the server answers a good request after each.

One tiny k=1 model is exported once (its TF1-loader check is tested in test_export.py and skipped
here) and served by one uvicorn on a free 127.0.0.1 port for the module, with small caps and a 1 s
read timeout so that the refusals are quick to provoke. Everything goes to 127.0.0.1 only, in bounded
loops.
"""

import concurrent.futures
import http.client
import json
import pathlib
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from conftest import b64, png_bytes, random_ids

from crn_tf import labels
from crn_tf.config import get_preset
from crn_tf.model import build_model
from crn_tf.studio.server import BackgroundServer, create_app
from export import saved_model as export_lib

SPACE = labels.get_label_space("cityscapes")
MAX_REQUEST_BYTES = 16 * 2**20
MAX_PIXELS = 2 * 256 * 512
READ_TIMEOUT_S = 1.0
PREDICT = "/v1/models/crn:predict"


def request(url: str, method: str = "GET", body=None, raw: bytes | None = None) -> tuple[int, dict]:
    """-> (status, JSON answer); every answer of the studio's must be JSON."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def good_request(url: str) -> None:
    """A small valid predict request; asserts it succeeds."""
    status, body = request(f"{url}{PREDICT}", "POST", {"inputs": {"label_ids": np.zeros((1, 16, 32), int).tolist()}})
    assert status == 200 and np.array(body["outputs"]).shape == (1, 16, 32, 3), body


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tf.keras.utils.set_random_seed(5)
    base = tmp_path_factory.mktemp("studio_bad_input") / "crn"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_lib, "verify_export", lambda export_dir, model: 0)  # tested in test_export.py
        export_lib.export_saved_model(build_model(get_preset("tiny")), str(base))
    return create_app(str(base), max_request_bytes=MAX_REQUEST_BYTES, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app, read_timeout_s=READ_TIMEOUT_S) as url:
        yield url


def _ids_png16() -> bytes:
    """Train ids 0..18 as a 16-bit grey PNG: decoded to uint8 they all became 0 (road), answered 200."""
    return png_bytes((np.arange(16 * 32).reshape(16, 32) % 19).astype(np.uint16))


def _rgb_png16() -> bytes:
    ids = (np.arange(16 * 32).reshape(16, 32) % 19).astype(np.uint8)
    return tf.io.encode_png(tf.constant(labels.ids_to_colors(ids, SPACE).astype(np.uint16) * 257)).numpy()


def _huge_png_header() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels, with no image data after it."""
    header = png_bytes(np.zeros((16, 32), np.uint8))[:33]
    return header[:16] + (100000).to_bytes(4, "big") * 2 + header[24:]


def _ids(value, shape=(1, 16, 32)) -> dict:
    return {"inputs": {"label_ids": np.full(shape, value).tolist()}}


def _png_request(data) -> dict:
    return {"signature_name": "synthesize_png", "instances": [b64(data) if isinstance(data, bytes) else data]}


_GOOD_PNG = png_bytes(random_ids((16, 32), seed=1))
BAD_PREDICT_BODIES = [
    # (what, JSON body or raw bytes, status, words in the error)
    ("signature_name a list", {"signature_name": ["x"], "instances": [1]}, 400, "'signature_name' must be a string"),
    ("signature_name a number", {"signature_name": 7, "instances": [1]}, 400, "must be a string, got int"),
    ("signature_name null", {"signature_name": None, "instances": [1]}, 400, "must be a string, got NoneType"),
    ("signature_name unknown and long", {"signature_name": "x" * 100000, "instances": [1]}, 400, "not found"),
    ("JSON nested 100,000 deep", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    ("ids nested 5,000 deep", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    ("16-bit grey PNG", _png_request(_ids_png16()), 400, "a 16-bit PNG; layouts must be 8-bit PNGs"),
    ("16-bit RGB PNG", _png_request(_rgb_png16()), 400, "a 16-bit PNG; layouts must be 8-bit PNGs"),
    ("truncated PNG", _png_request(_GOOD_PNG[:70]), 400, "Invalid PNG data, size 70"),
    ("PNG header only", _png_request(_GOOD_PNG[:33]), 400, "Invalid PNG"),
    ("not JSON", b"{instances: 1", 400, "not JSON"),
    ("empty body", b"", 400, "not JSON"),
    ("not UTF-8", b'{"instances": ["\xff\xfe"]}', 400, "not JSON"),
    ("JSON null", b"null", 400, "JSON object"),
    ("JSON list", b"[1, 2]", 400, "JSON object"),
    ("an integer of 5,000 digits", b'{"instances": [[[' + b"9" * 5000 + b"]]]}", 400, "not usable JSON"),
    ("ids NaN", b'{"instances": [[[NaN]]]}', 400, "integers"),
    ("ids booleans", _ids(True), 400, "integers"),
    ("ids strings", _ids("1"), 400, "integers"),
    ("ids beyond int64", _ids(2**70), 400, "integers"),
    ("ids negative", _ids(-1), 400, "0..255"),
    ("ids out of range", _ids(300), 400, "0..255"),
    ("ids of rank 2", {"inputs": {"label_ids": np.zeros((16, 32), int).tolist()}}, 400, "expected shape [N, H, W]"),
    ("ids ragged", {"instances": [[[0, 1], [2]]]}, 400, "rectangular"),
    ("ids 40 levels deep", {"instances": [[[[[[[[[[0]]]]]]]]]] * 4}, 400, "label_ids"),
    ("ids of a wrong size", _ids(0, (1, 16, 30)), 400, "16x30"),
    ("ids empty", {"inputs": {"label_ids": [[[]]]}}, 400, "positive multiples of 4"),
    ("no instances", {"signature_name": "synthesize_png"}, 400, "Missing 'inputs' or 'instances'"),
    ("instances and inputs", {"instances": [1], "inputs": [1]}, 400, "not both"),
    ("instances empty", {"instances": []}, 400, "non-empty list"),
    ("instances an object", {"instances": {"a": 1}}, 400, "non-empty list"),
    ("instances null", {"instances": None}, 400, "non-empty list"),
    ("input misnamed", {"instances": [{"label_idz": [[0]]}]}, 400, "takes one input 'label_ids'"),
    ("many input names", {"instances": [{f"k{i}": 0 for i in range(20000)}]}, 400, "takes one input"),
    ("b64 not a string", _png_request({"b64": 5}), 400, 'expected {"b64"'),
    ("b64 with other keys", _png_request({"b64": "", "x": 1}), 400, "keys ['b64', 'x']"),
    ("bad base64", _png_request({"b64": "!!"}), 400, "base64"),
    ("PNG a number", _png_request(5), 400, "got int"),
    ("non-PNG", _png_request(b"GIF89a...."), 400, "not a PNG"),
    ("PNG as a plain string", _png_request("x" * 100), 400, "not a PNG"),
    ("PNG list empty", {"signature_name": "synthesize_png", "inputs": []}, 400, "empty batch"),
    (
        "PNG of a wrong size",
        _png_request(png_bytes(np.zeros((18, 32), np.uint8))),
        400,
        "layout 0 is 18x32: CRN 'tiny' needs height and width that are positive multiples of 4",
    ),
    ("PNG of 0x0 pixels", _png_request(_GOOD_PNG[:16] + bytes(8) + _GOOD_PNG[24:]), 400, "layout 0 is 0x0"),
    ("PNG claiming 10^10 pixels", _png_request(_huge_png_header()), 413, "--max_pixels"),
    ("too many id pixels", _ids(0, (1, 512, 1024)), 413, "--max_pixels"),
    ("body over the byte cap, streamed", b" " * (MAX_REQUEST_BYTES // 2) + b"," * (MAX_PIXELS + 100), 413, "label ids"),
]


@pytest.mark.parametrize("what,body,status,words", BAD_PREDICT_BODIES, ids=[c[0] for c in BAD_PREDICT_BODIES])
def test_bad_predict_bodies(server, what, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got_status, answer = request(f"{server}{PREDICT}", "POST", None if raw is not None else body, raw=raw)
    assert got_status == status, answer
    assert set(answer) == {"error"} and words in answer["error"], answer
    assert len(answer["error"]) < 1000  # nothing of a large body is echoed back
    good_request(server)


BAD_PATHS = [
    # (method, path, status, error) as TF Serving answers
    ("GET", "/v1/models", 400, "Malformed request: GET /v1/models"),
    ("GET", "/v1/models/", 400, "Malformed request: GET /v1/models/"),
    ("GET", "/v1", 400, "Malformed request: GET /v1"),
    ("GET", "/v1/foo", 400, "Malformed request: GET /v1/foo"),
    ("GET", "/v1/models/crn/versions/x", 400, "Malformed request: GET /v1/models/crn/versions/x"),
    ("GET", "/v1/models/crn/labels/x/metadata", 400, "Malformed request"),
    ("GET", "/v1/models/crn:predict", 400, "Malformed request: GET /v1/models/crn:predict"),
    ("POST", "/v1/models/crn", 400, "Malformed request: POST /v1/models/crn"),
    ("POST", "/v1/models/crn:classify", 400, "Malformed request: POST /v1/models/crn:classify"),
    ("PUT", "/v1/models/crn:predict", 400, "Malformed request: PUT /v1/models/crn:predict"),
    ("DELETE", "/v1/models/crn", 400, "Malformed request: DELETE /v1/models/crn"),
    ("GET", "/v1/models/" + "x" * 5000, 404, "Servable not found for request: Latest("),
    ("GET", "/v1/models/other", 404, "Servable not found for request: Latest(other)"),
    ("GET", "/v1/models/crn/versions/9", 404, "Servable not found for request: Specific(crn, 9)"),
    ("GET", "/nothing", 404, "Not Found"),
    ("POST", "/", 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method,path,status,error", BAD_PATHS, ids=[f"{m} {p[:40]}" for m, p, _, _ in BAD_PATHS])
def test_bad_paths(server, method, path, status, error):
    got_status, answer = request(server + path, method, raw=b"{}" if method in ("POST", "PUT") else None)
    assert got_status == status and set(answer) == {"error"} and answer["error"].startswith(error), answer
    assert len(answer["error"]) < 1000
    good_request(server)


def _raw_exchange(url: str, data: bytes, wait_s: float = 10.0) -> tuple[bytes, float]:
    """Sends raw bytes on a fresh connection and reads until the server closes it: (answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        if data:
            sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


def _json_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_malformed_http_is_a_json_400(server):
    answer, _ = _raw_exchange(server, b"NOT HTTP AT ALL\r\n\r\n")
    status, body = _json_answer(answer)
    assert status == 400 and "Invalid HTTP request" in body["error"]
    good_request(server)


def test_a_body_over_the_byte_cap_is_refused_before_it_is_sent(server):
    """Content-Length over the cap: 413 at once; the server does not wait for (or read) the body."""
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_REQUEST_BYTES + 1}\r\n\r\n"
    answer, seconds = _raw_exchange(server, head.encode())
    status, body = _json_answer(answer)
    assert status == 413 and "--max_request_mb" in body["error"] and seconds < READ_TIMEOUT_S
    good_request(server)


@pytest.fixture(scope="module")
def body_34mb(tmp_path_factory) -> pathlib.Path:
    """A 2048x2048 layout of label ids as JSON, 34 MB with its spaces (the module's cap is 16 MiB)."""
    ids = json.dumps({"inputs": {"label_ids": [random_ids((2048, 2048), seed=2).tolist()]}}).encode()
    path = tmp_path_factory.mktemp("oversized") / "body.json"
    path.write_bytes(ids + b" " * (34_000_000 - len(ids)))
    return path


def _post_http_client(url: str, body, chunked: bool = False) -> tuple[int, dict]:
    """POST with Python's http.client, which sends the whole body before it reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", PREDICT, body, headers, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _post_requests(url: str, body: bytes) -> tuple[int, dict]:
    requests = pytest.importorskip("requests", reason="requests is not installed (not a crn_tf dependency)")
    response = requests.post(url + PREDICT, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    return response.status_code, response.json()


def _post_curl(url: str, path: pathlib.Path, *options: str) -> tuple[int, dict]:
    if shutil.which("curl") is None:
        pytest.skip("no curl binary on PATH")
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-H", "Content-Type: application/json", *options,
         "--data-binary", f"@{path}", "-w", "\\n%{http_code}", url + PREDICT],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(answer)


OVERSIZED_CLIENTS = {
    "http.client, Content-Length": lambda url, path: _post_http_client(url, path.read_bytes()),
    "http.client, chunked (refused while it streams)": lambda url, path: _post_http_client(
        url, (path.read_bytes()[i : i + 2**20] for i in range(0, 34 * 2**20, 2**20)), chunked=True
    ),
    "requests": lambda url, path: _post_requests(url, path.read_bytes()),
    "curl (Expect: 100-continue)": lambda url, path: _post_curl(url, path),
    "curl, no Expect": lambda url, path: _post_curl(url, path, "-H", "Expect:"),
}


@pytest.fixture(scope="module")
def patient_server(app):
    """crn-studio's default read deadline (30 s): the whole 34 MB must reach the server within it, also
    the part drained after the 413 (the module's 1 s deadline is for the slow-client tests; on a busy
    2-core machine sending 34 MB took longer, and the server rightly closed mid-body)."""
    with BackgroundServer(app, read_timeout_s=30.0) as url:
        yield url


@pytest.mark.parametrize("client", OVERSIZED_CLIENTS)
def test_a_34_mb_body_gets_its_413_in_every_client(patient_server, body_34mb, client):
    """Answered before the body is in, the 413 used to be followed by a close that reset the connection
    (unread bytes), so clients that send the whole body first (http.client) saw ConnectionResetError."""
    status, answer = OVERSIZED_CLIENTS[client](patient_server, body_34mb)
    assert status == 413 and set(answer) == {"error"}, answer
    assert "--max_request_mb" in answer["error"] or "--max_pixels" in answer["error"], answer
    good_request(patient_server)


def test_expect_100_continue_gets_the_413_instead_of_100(server):
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 34000000\r\nExpect: 100-continue\r\n\r\n"
    answer, seconds = _raw_exchange(server, head.encode())
    assert answer.startswith(b"HTTP/1.1 413 ") and seconds < READ_TIMEOUT_S  # no 100 Continue first
    assert "--max_request_mb" in _json_answer(answer)[1]["error"]


def _send_until_closed(url: str, head: bytes, total: int, pause_s: float = 0.0) -> tuple[int, float, bytes]:
    """Sends `head` and then up to `total` bytes of spaces until the server stops taking them:
    (bytes of body sent, seconds, what the server answered)."""
    host, port = url.removeprefix("http://").split(":")
    sent, start, chunk = 0, time.monotonic(), b" " * 2**16
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
        sock.sendall(head)
        try:
            while sent < total:
                sent += sock.send(chunk)
                time.sleep(pause_s)
        except OSError:  # the server closed: reset or broken pipe
            pass
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    return sent, time.monotonic() - start, answer


def test_draining_after_a_413_is_bounded_in_bytes_and_time(app, server):
    """The lingering close reads at most max_drain_bytes of the rest of a body, within the read deadline."""
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode()
    with BackgroundServer(app, read_timeout_s=30, max_drain_bytes=2**20) as small_drain:
        sent, seconds, _ = _send_until_closed(small_drain, head, 256 * 2**20)
    # 1 MiB drained, plus what the two sockets' buffers hold (a few MiB on loopback).
    assert sent < 32 * 2**20 and seconds < 10, (sent, seconds)
    # A client that trickles its body is cut at the read deadline (1 s here), not when its body ends.
    sent, seconds, _ = _send_until_closed(server, head, 200 * 2**16, pause_s=0.05)  # 10 s if never cut
    assert READ_TIMEOUT_S * 0.9 <= seconds < READ_TIMEOUT_S + 5, seconds
    good_request(server)


SLOW_CLIENTS = {
    "idle connection": b"",
    "headers never finished": b"POST /v1/models/crn:predict HTTP/1.1\r\nHost: x\r\nContent-Le",
    "body half sent": b'POST /v1/models/crn:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inst',
}


def test_slow_and_idle_connections_time_out(server):
    """They used to be held open forever (with their half body). The three run at once: one timeout."""
    with concurrent.futures.ThreadPoolExecutor(len(SLOW_CLIENTS)) as pool:
        exchanges = {what: pool.submit(_raw_exchange, server, data) for what, data in SLOW_CLIENTS.items()}
        for what, exchange in exchanges.items():
            answer, seconds = exchange.result()
            assert READ_TIMEOUT_S * 0.9 <= seconds < READ_TIMEOUT_S + 5, what
            status, body = _json_answer(answer)
            assert status == 408 and "--read_timeout_s" in body["error"], what
    good_request(server)


def _rss_bytes() -> int:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * 4096


def _timed_good_request(url: str) -> float:
    start = time.perf_counter()
    good_request(url)
    return time.perf_counter() - start


def _send_oversized(url: str, body: bytes) -> None:
    """POSTs `body` and reads the answer (the server answers 413 mid-upload and drains the rest)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        try:
            sock.sendall(body)
            while sock.recv(65536):
                pass
        except OSError:
            pass


def test_a_burst_of_oversized_bodies_leaves_good_requests_fast_and_memory_back(server):
    """8 id bodies at the byte cap, ~8x over the pixel cap, sent at once. Each used to be parsed whole
    (~280 MB and 3 s of CPU per 32 MB) while a small request waited 20.9 s instead of 8 ms; now the
    ids are counted as they stream in and each is refused after max_pixels ids."""
    row = b"[" + b"0," * 1023 + b"0]"
    body = b'{"inputs": {"label_ids": [[' + b",".join([row] * (MAX_REQUEST_BYTES // 2050 - 8)) + b"]]}}"
    assert MAX_REQUEST_BYTES - 2**16 < len(body) <= MAX_REQUEST_BYTES and body.count(b",") > 7 * MAX_PIXELS
    for _ in range(3):
        good_request(server)  # warm
    rss_before = _rss_bytes()
    # Timing on a shared machine: up to 3 bursts, the first that meets the bound counts (the code before
    # this test stalled good requests for 0.3-9 s in every burst).
    for _attempt in range(3):
        idle = statistics.median(_timed_good_request(server) for _ in range(7))
        latencies = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            attacks = [pool.submit(_send_oversized, server, body) for _ in range(8)]
            while not all(a.done() for a in attacks) or len(latencies) < 5:
                latencies.append(_timed_good_request(server))
            for a in attacks:
                a.result()
        print(f"idle {idle * 1e3:.1f} ms; in the burst {[round(t * 1e3, 1) for t in latencies]} ms")
        # The bound, 10x the idle latency, for every good request sent while the burst was in
        # flight but one: a single request can lose a time slice to anything.
        if sorted(latencies)[-2] <= 10 * idle:
            break
    assert sorted(latencies)[-2] <= 10 * idle, (idle, latencies)
    rss_after = _rss_bytes()
    print(f"RSS {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB after")
    # Memory: each refused body held at most its first max_pixels ids (~0.5 MB); allow 64 MB for the
    # allocator keeping freed buffers and the test's own threads.
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)
    good_request(server)


def test_requests_still_served_after_everything(server):
    status, body = request(f"{server}/v1/models/crn")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    assert threading.active_count() < 50  # no thread left behind per refused request
