"""crn-studio: paint a semantic layout in the browser, get the CRN's photo back.

    crn-studio --saved_model=exports/crn          # then open http://127.0.0.1:8080/
    crn-studio --serving_url=http://localhost:8501/v1/models/crn --saved_model=exports/crn  # via TF Serving

(also `python -m crn_tf.studio ...`). Serves one static page (static/) and a TF-Serving-compatible
REST API (`GET /v1/models/<name>`, `GET /v1/models/<name>/metadata`, `POST /v1/models/<name>:predict`,
also under `/versions/<v>`), backed by the SavedModel loaded in this process, or forwarded to a running
TF Serving with --serving_url (then --saved_model is only read for its assets.extra/ label space and
config, which the page needs). Requests are capped (--max_request_mb, --max_pixels; enforced while the
body streams in, before it is parsed), must arrive within --read_timeout_s, and are refused with TF
Serving's `{"error": "..."}` and a 4xx; a 413 reaches clients that send the whole body before they read
(the rest of the body is drained within bounds: `studio_protocol`). Cost: the tiny test model answers
in milliseconds; the paper-width cityscapes_256p model takes minutes to load its first request and
~100 s per 256x512 photo on 2 CPU cores.
Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import pathlib
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from crn_tf import labels
from crn_tf.studio import rest
from crn_tf.studio.backends import BackendError, LocalBackend, RemoteBackend, read_model_info, resolve_version_dir
from crn_tf.studio.batching import BatchingOptions

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
SAMPLES_DIR = STATIC_DIR / "samples"
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
# One 1024x2048 layout (the largest preset's native size), or eight 256x512 ones, per request.
DEFAULT_MAX_PIXELS = 1024 * 2048
# A request (headers and body) must arrive within this; 32 MiB takes well under a second on a LAN.
DEFAULT_READ_TIMEOUT_S = 30.0
# After answering a request before its body is in (413), read and discard at most this much more of
# the body, so that a client that sends the whole body before it reads (Python's http.client,
# requests) sees the answer instead of a connection reset (a lingering close, as nginx does).
DEFAULT_MAX_DRAIN_BYTES = 64 * 2**20
# The bundled samples (examples/layouts) are coloured with the Cityscapes palette.
SAMPLES_PALETTE = labels.CITYSCAPES.palette
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_MODEL_PATH_RE = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<suffix>/metadata|:[a-z]+)?$")

log = logging.getLogger("crn_studio")


def _json(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(message: str, status: int) -> Response:
    # A 413 may come before the body was read: the connection closes after it (the rest of the body
    # is drained first, within bounds: studio_protocol).
    return _json({"error": message}, status, {"connection": "close"} if status == 413 else None)


def _malformed(request: Request) -> Response:
    """TF Serving's answer to a /v1/ path or method it does not serve (e.g. GET /v1/models)."""
    return _error(f"Malformed request: {request.method} {_cut(request.url.path)}", 400)


def _cut(text: str, limit: int = 200) -> str:
    """A client-supplied string, cut for an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (404 for an unknown page, 405) as JSON too."""
    return _error(exc.detail or "error", exc.status_code)


async def _malformed_route(request: Request) -> Response:
    return _malformed(request)


async def _read_body(request: Request, limits: rest.Limits) -> bytes:
    """The request body, refused (413) as soon as it exceeds the byte cap or holds more label ids than
    the pixel cap allows (counted as it streams in: rest.IdCounter), before any of it is parsed."""
    limit = limits.max_request_bytes
    too_large = rest.RequestError(
        f"request body is larger than {limit} bytes (crn-studio --max_request_mb); send a smaller layout", 413
    )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    ids = rest.IdCounter(limits.max_pixels)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise too_large
        ids.feed(chunk)
        body += chunk
    return bytes(body)


def _decode_layouts(request: rest.PredictRequest, space: labels.LabelSpace) -> list:
    """The label ids the model sees for each layout of a request (PNGs decoded by the signature's own graph code)."""
    if rest.LABEL_IDS in request.inputs:
        return list(request.inputs[rest.LABEL_IDS])
    from crn_tf.serving_graph import decode_label_png_graph  # deferred: TensorFlow, for this test route only

    return [decode_label_png_graph(png, space).numpy() for png in request.inputs[rest.LABEL_PNG_BYTES]]


def create_app(
    saved_model: str | None = None,
    serving_url: str | None = None,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = 600.0,
    debug_routes: bool = False,
    batching: BatchingOptions | None = None,
) -> Starlette:
    """The crn-studio web app (an ASGI app: run it with uvicorn, test it with Starlette's TestClient).

    Args:
        saved_model: a crn-export base (its newest version is served) or version directory. With
            `serving_url`, only its assets.extra/ files are read (label space, config).
        serving_url: a running TF Serving's model URL, `http://HOST:8501/v1/models/NAME`, to forward
            predictions to instead of loading the SavedModel here.
        max_request_bytes: largest predict body accepted (413 beyond).
        max_pixels: largest total layout pixels in one predict request (413 beyond).
        timeout_s: how long to wait for TF Serving (serving_url only).
        debug_routes: also serve `GET /studio/debug/last_request`, the label ids of the last predict
            request as the model saw them (for tests; off in the CLI unless --debug_routes).
        batching: merge concurrent predict requests into batched model calls (as TF Serving's
            --enable_batching); only for the in-process SavedModel.

    Raises:
        ValueError: no export at `saved_model`, a malformed `serving_url`, or neither given.
    """
    if not saved_model:
        raise ValueError(
            "crn-studio needs --saved_model (an export base such as exports/crn); with --serving_url it is "
            "only read for the label space and native size"
        )
    if serving_url and batching:
        raise ValueError(
            "--enable_batching batches the in-process SavedModel; TF Serving has its own --enable_batching"
        )
    if serving_url:
        version_dir, name, version = resolve_version_dir(saved_model)
        backend = RemoteBackend(serving_url, read_model_info(version_dir, name, version), timeout_s)
    else:
        backend = LocalBackend(saved_model, batching)
    info = backend.info
    limits = rest.Limits(
        max_request_bytes, max_pixels, info.config.size_multiple, info.config.native_size, info.config.name
    )
    state = {"last_request": None}

    def studio_config(request: Request) -> Response:
        space = info.label_space
        samples = []
        if space.palette[: len(SAMPLES_PALETTE)] == SAMPLES_PALETTE and SAMPLES_DIR.is_dir():
            samples = [{"name": p.stem, "url": f"/static/samples/{p.name}"} for p in sorted(SAMPLES_DIR.glob("*.png"))]
        return _json(
            {
                "model": {
                    "name": info.name,
                    "version": info.version,
                    "preset": info.config.name,
                    "native_size": list(info.config.native_size),
                    "size_multiple": info.config.size_multiple,
                    "num_outputs": info.config.num_outputs,
                },
                "label_space": {
                    "name": space.name,
                    "classes": [
                        {"id": i, "name": n, "color": list(c)}
                        for i, (n, c) in enumerate(zip(space.class_names, space.palette))
                    ],
                    "void": {"id": labels.VOID_ID, "color": list(labels.VOID_COLOR)},
                },
                "predict_url": f"/v1/models/{info.name}:predict",
                "backend": "tf_serving" if serving_url else "saved_model",
                "limits": {"max_request_bytes": max_request_bytes, "max_pixels": max_pixels},
                "samples": samples,
            }
        )

    async def models(request: Request) -> Response:
        path = request.path_params["path"]
        match = _MODEL_PATH_RE.match(path)
        method = request.method
        if not match:
            return _malformed(request)
        if match["name"] != info.name:
            return _error(
                f"Servable not found for request: Latest({_cut(match['name'])}) (this server has {info.name!r})",
                404,
            )
        version = int(match["version"]) if match["version"] else None
        suffix = match["suffix"]
        try:
            if method == "GET" and suffix is None:
                return _json(await run_in_threadpool(backend.status, version))
            if method == "GET" and suffix == "/metadata":
                return _json(await run_in_threadpool(backend.metadata, version))
            if method == "POST" and suffix == ":predict":
                body = await _read_body(request, limits)
                parsed = await run_in_threadpool(rest.parse_predict, body, limits)
                rest.check_request(parsed, limits)
                if debug_routes:
                    state["last_request"] = parsed
                status, payload = await run_in_threadpool(backend.predict, parsed, body, version)
                return await run_in_threadpool(_json, payload, status)
        except rest.RequestError as e:
            return _error(str(e), e.status)
        except BackendError as e:
            return _json(e.body, e.status)
        except ClientDisconnect:  # the client went away (or was timed out) mid-body: nobody to answer
            return _error("client disconnected", 400)
        except Exception as e:  # noqa: BLE001 - a JSON error for the page instead of a bare 500
            log.exception("predict failed")
            return _error(f"internal error: {type(e).__name__}: {e}", 500)
        return _malformed(request)

    async def last_request(request: Request) -> Response:
        parsed = state["last_request"]
        if parsed is None:
            return _error("no predict request yet", 404)
        layouts = await run_in_threadpool(_decode_layouts, parsed, info.label_space)
        return _json(
            {
                "signature_name": parsed.signature_name,
                "layouts": [
                    {
                        "shape": list(ids.shape),
                        "label_ids_b64": base64.b64encode(ids.astype("uint8").tobytes()).decode(),
                    }
                    for ids in layouts
                ],
            }
        )

    def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", index),
        Route("/studio/config", studio_config),
        Route("/v1/models/{path:path}", models, methods=_ALL_METHODS),
        # Everything else under /v1 is TF Serving's 400 "Malformed request" (GET /v1/models included).
        Route("/v1", _malformed_route, methods=_ALL_METHODS),
        Route("/v1/{path:path}", _malformed_route, methods=_ALL_METHODS),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    if debug_routes:
        routes.append(Route("/studio/debug/last_request", last_request))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.router.redirect_slashes = False  # /v1/models -> /v1/models/ -> 404 was not TF Serving's answer
    app.state.backend = backend
    app.state.info = info
    return app


# ---- command line -------------------------------------------------------------------------------


def define_flags() -> None:
    """Defines the crn-studio flags (not at import: tests import this module)."""
    from absl import flags

    flags.DEFINE_string("saved_model", None, "crn-export base (newest version served) or version dir, e.g. exports/crn")
    flags.DEFINE_string(
        "serving_url", None, "forward predictions to this TF Serving model URL, http://HOST:8501/v1/models/NAME"
    )
    flags.DEFINE_string("host", "127.0.0.1", "interface to bind; 0.0.0.0 exposes the studio to your network")
    flags.DEFINE_integer("port", 8080, "port to bind; 0 = any free port (printed)")
    flags.DEFINE_integer("max_request_mb", DEFAULT_MAX_REQUEST_BYTES // 2**20, "largest predict request body, MiB")
    flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "largest total layout pixels in one predict request")
    flags.DEFINE_float("timeout_s", 600.0, "how long to wait for TF Serving's answer (--serving_url)")
    flags.DEFINE_float(
        "read_timeout_s", DEFAULT_READ_TIMEOUT_S, "seconds a request may take to arrive whole (else 408)"
    )
    flags.DEFINE_bool("debug_routes", False, "serve GET /studio/debug/last_request (tests)")
    flags.DEFINE_bool("enable_batching", False, "merge concurrent predict requests into batched model calls")
    flags.DEFINE_integer("max_batch_size", BatchingOptions.max_batch_size, "most layouts in one batched call")
    flags.DEFINE_float(
        "batch_timeout_ms", BatchingOptions.batch_timeout_s * 1000, "how long a request waits for others to join"
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port} ({e.strerror}); choose another --port") from e
    sock.listen(128)
    return sock


class _CycleTransport:
    """The connection's transport as uvicorn's request cycle sees it: everything passes through, but
    its close() goes to the protocol, which may turn it into a lingering close."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_transport()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


def studio_protocol(read_timeout_s: float, max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES) -> type:
    """uvicorn's h11 HTTP protocol with a read deadline, a lingering close, and JSON for its own 400s.

    A request must arrive whole, headers and body, within `read_timeout_s` of its first byte (or of the
    connection, for a connection that sends nothing): a slow or stalled client gets 408 and the
    connection is closed, instead of holding it (and its buffered body) forever. Idle keep-alive
    connections are closed by uvicorn after 5 s. Malformed HTTP gets `{"error": ...}` 400.

    A response sent before the request's body is in (a 413 for a Content-Length over the cap, or for a
    body that passed a cap while it streamed in) is followed by a lingering close: the server half-closes
    (the answer is complete), then reads and discards the rest of the body, at most `max_drain_bytes`
    and within the same read deadline, and closes once the body has ended or the client has gone.
    Closing at once would leave unread bytes in the server's socket, which makes the kernel reset the
    connection, and a client that sends its whole body before reading (Python's http.client, requests)
    would get ConnectionResetError instead of the 413. A client that sent `Expect: 100-continue` gets the
    413 before it sends any body (uvicorn sends 100 Continue only when the app reads the body).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timed_out = json.dumps(
        {"error": f"request not received in full within {read_timeout_s:g} s (crn-studio --read_timeout_s)"}
    ).encode()

    class StudioProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        lingering = False
        _lost = False
        drained = 0  # bytes of the current request's body read after its response was complete

        def connection_made(self, transport) -> None:
            self._socket_transport = transport
            super().connection_made(_CycleTransport(transport, self))
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self.lingering, self._lost = False, True
            super().connection_lost(exc)

        def close_transport(self) -> None:
            """Every close of the connection: linger if a response went out before its request's body was in."""
            answered_early = self.cycle is not None and self.cycle.response_complete
            if answered_early and not (self.lingering or self._lost) and self.conn.their_state is h11.SEND_BODY:
                self._linger()
            else:
                self._close()

        def _close(self) -> None:
            self.lingering = False
            self._socket_transport.close()

        def _linger(self) -> None:
            self.lingering = True
            self.cycle.body = bytearray()  # what uvicorn buffered for the app, which will not read it
            self._arm()  # the read deadline still holds
            if self._socket_transport.can_write_eof():
                self._socket_transport.write_eof()  # after the answer: a client reading to EOF is done
            self.flow.resume_reading()
            self._drain(b"")  # h11 may hold the body's end already

        def _drain(self, data: bytes) -> None:
            self.drained += len(data)
            if self.drained > max_drain_bytes:
                self._close()  # bounded work: the client may see a reset now
                return
            try:
                if data:  # b"" would tell h11 that the client closed
                    self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not h11.NEED_DATA:
                    if type(event) is not h11.Data:  # EndOfMessage (or PAUSED): the body is in
                        self._close()
                        return
            except h11.RemoteProtocolError:
                self._close()

        def shutdown(self) -> None:
            if self.lingering:
                self._close()
            else:
                super().shutdown()

        def data_received(self, data: bytes) -> None:
            if self.lingering:
                self._drain(data)
                return
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
                # Answered early on a kept-alive connection: uvicorn discards the rest of the body; bounded too.
                self.drained += len(data)
                if self.drained > max_drain_bytes:
                    self._close()
                    return
            else:
                self.drained = 0
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()  # the request is in (or the connection is done): processing takes what it takes
            else:
                self._arm()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _read_timed_out(self) -> None:
            self._deadline = None
            if self._socket_transport.is_closing():
                return
            if not self.lingering and (self.cycle is None or not self.cycle.response_started):
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(timed_out)}\r\nconnection: close\r\n\r\n".encode()
                    + timed_out
                )
            self._close()  # the app's pending receive() sees a disconnect

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": msg}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._close()

    return StudioProtocol


def _uvicorn_server(
    app: Starlette,
    log_level: str,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES,
):
    import uvicorn

    protocol = studio_protocol(read_timeout_s, max_drain_bytes)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, http=protocol)
    return uvicorn.Server(config)


def serve(
    app: Starlette,
    sock: socket.socket,
    log_level: str = "info",
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES,
) -> None:
    """Serves `app` on an already bound socket with uvicorn until interrupted (Ctrl+C, SIGTERM)."""
    _uvicorn_server(app, log_level, read_timeout_s, max_drain_bytes).run(sockets=[sock])


class BackgroundServer:
    """Serves an app with uvicorn in a daemon thread, for tests and notebooks:

    with BackgroundServer(create_app("exports/crn")) as url:   # url = "http://127.0.0.1:<free port>"
        ...
    """

    def __init__(
        self,
        app: Starlette,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES,
    ):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.read_timeout_s, self.max_drain_bytes = read_timeout_s, max_drain_bytes

    def __enter__(self) -> str:
        self._sock = bind_socket(self.host, self.port)
        self._server = _uvicorn_server(self.app, self.log_level, self.read_timeout_s, self.max_drain_bytes)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("crn-studio: the background server did not start")
            time.sleep(0.01)
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def banner(studio: Starlette, sock: socket.socket) -> str:
    """What crn-studio serves and where: the model, its version and source, and the URL to open."""
    info = studio.state.info
    host, port = sock.getsockname()[:2]
    h, w = info.config.native_size
    backend = studio.state.backend
    source = getattr(backend, "url", None) or backend.version_dir
    url_host = f"[{host}]" if ":" in host else host
    return (
        f"crn-studio: model {info.name!r} version {info.version} ({info.config.name}, {h}x{w}, "
        f"k={info.config.num_outputs}) from {source}\nopen http://{url_host}:{port}/"
    )


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    from crn_tf import fileio

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    fileio.quiet_absl_logging()
    try:
        studio = create_app(
            FLAGS.saved_model,
            FLAGS.serving_url,
            max_request_bytes=FLAGS.max_request_mb * 2**20,
            max_pixels=FLAGS.max_pixels,
            timeout_s=FLAGS.timeout_s,
            debug_routes=FLAGS.debug_routes,
            batching=(
                BatchingOptions(FLAGS.max_batch_size, FLAGS.batch_timeout_ms / 1000) if FLAGS.enable_batching else None
            ),
        )
        sock = bind_socket(FLAGS.host, FLAGS.port)
    except ValueError as e:
        sys.exit(f"crn-studio: {e}")
    print(banner(studio, sock), flush=True)
    # After a 413, up to max(64 MiB, --max_request_mb) more bytes of its body are read and discarded.
    max_drain_bytes = max(DEFAULT_MAX_DRAIN_BYTES, FLAGS.max_request_mb * 2**20)
    serve(studio, sock, read_timeout_s=FLAGS.read_timeout_s, max_drain_bytes=max_drain_bytes)


def run() -> None:
    """Console-script entry point: `crn-studio`."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
