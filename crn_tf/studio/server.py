"""crn-studio: paint a semantic layout in the browser, get the CRN's photo back.

    crn-studio --saved_model=exports/crn          # then open http://127.0.0.1:8080/
    crn-studio --serving_url=http://localhost:8501/v1/models/crn --saved_model=exports/crn  # via TF Serving

(also `python -m crn_tf.studio ...`). Serves one static page (static/) and a TF-Serving-compatible
REST API (`GET /v1/models/<name>`, `GET /v1/models/<name>/metadata`, `POST /v1/models/<name>:predict`,
also under `/versions/<v>`), backed by the SavedModel loaded in this process, or forwarded to a running
TF Serving with --serving_url (then --saved_model is only read for its assets.extra/ label space and
config, which the page needs). Requests are capped (--max_request_mb, --max_pixels) and refused with
TF Serving's `{"error": "..."}`. Cost: the tiny test model answers in milliseconds; the paper-width
cityscapes_256p model takes minutes to load its first request and ~100 s per 256x512 photo on 2 CPU cores.
Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

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
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from crn_tf import labels
from crn_tf.studio import rest
from crn_tf.studio.backends import BackendError, LocalBackend, RemoteBackend, read_model_info, resolve_version_dir

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
SAMPLES_DIR = STATIC_DIR / "samples"
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
# One 1024x2048 layout (the largest preset's native size), or eight 256x512 ones, per request.
DEFAULT_MAX_PIXELS = 1024 * 2048
# The bundled samples (examples/layouts) are coloured with the Cityscapes palette.
SAMPLES_PALETTE = labels.CITYSCAPES.palette
_MODEL_PATH_RE = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<suffix>/metadata|:[a-z]+)?$")

log = logging.getLogger("crn_studio")


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds `limit` bytes."""
    too_large = rest.RequestError(
        f"request body is larger than {limit} bytes (crn-studio --max_request_mb); send a smaller layout", 413
    )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_layouts(request: rest.PredictRequest, space: labels.LabelSpace) -> list:
    """The label ids the model sees for each layout of a request (PNGs decoded by the export's own graph code)."""
    if rest.LABEL_IDS in request.inputs:
        return list(request.inputs[rest.LABEL_IDS])
    from export.signatures import decode_label_png_graph

    return [decode_label_png_graph(png, space).numpy() for png in request.inputs[rest.LABEL_PNG_BYTES]]


def create_app(
    saved_model: str | None = None,
    serving_url: str | None = None,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = 600.0,
    debug_routes: bool = False,
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

    Raises:
        ValueError: no export at `saved_model`, a malformed `serving_url`, or neither given.
    """
    if not saved_model:
        raise ValueError(
            "crn-studio needs --saved_model (an export base such as exports/crn); with --serving_url it is "
            "only read for the label space and native size"
        )
    if serving_url:
        version_dir, name, version = resolve_version_dir(saved_model)
        backend = RemoteBackend(serving_url, read_model_info(version_dir, name, version), timeout_s)
    else:
        backend = LocalBackend(saved_model)
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
        if not match:
            return _error(f"Malformed request: {request.method} {request.url.path}", 404)
        if match["name"] != info.name:
            return _error(
                f"Servable not found for request: Latest({match['name']}) (this server has {info.name!r})", 404
            )
        version = int(match["version"]) if match["version"] else None
        suffix, method = match["suffix"], request.method
        try:
            if method == "GET" and suffix is None:
                return _json(await run_in_threadpool(backend.status, version))
            if method == "GET" and suffix == "/metadata":
                return _json(await run_in_threadpool(backend.metadata, version))
            if method == "POST" and suffix == ":predict":
                body = await _read_body(request, limits.max_request_bytes)
                parsed = await run_in_threadpool(rest.parse_predict, body)
                rest.check_request(parsed, limits)
                if debug_routes:
                    state["last_request"] = parsed
                status, payload = await run_in_threadpool(backend.predict, parsed, body, version)
                return await run_in_threadpool(_json, payload, status)
        except rest.RequestError as e:
            return _error(str(e), e.status)
        except BackendError as e:
            return _json(e.body, e.status)
        except Exception as e:  # noqa: BLE001 - a JSON error for the page instead of a bare 500
            log.exception("predict failed")
            return _error(f"internal error: {type(e).__name__}: {e}", 500)
        return _error(f"Malformed request: {method} {request.url.path}", 404 if method in ("GET", "POST") else 405)

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
        Route("/v1/models/{path:path}", models, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    if debug_routes:
        routes.append(Route("/studio/debug/last_request", last_request))
    app = Starlette(routes=routes)
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
    flags.DEFINE_bool("debug_routes", False, "serve GET /studio/debug/last_request (tests)")


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


def _uvicorn_server(app: Starlette, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


def serve(app: Starlette, sock: socket.socket, log_level: str = "info") -> None:
    """Serves `app` on an already bound socket with uvicorn until interrupted (Ctrl+C, SIGTERM)."""
    _uvicorn_server(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """Serves an app with uvicorn in a daemon thread, for tests and notebooks:

    with BackgroundServer(create_app("exports/crn")) as url:   # url = "http://127.0.0.1:<free port>"
        ...
    """

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level

    def __enter__(self) -> str:
        self._sock = bind_socket(self.host, self.port)
        self._server = _uvicorn_server(self.app, self.log_level)
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
        )
        sock = bind_socket(FLAGS.host, FLAGS.port)
    except ValueError as e:
        sys.exit(f"crn-studio: {e}")
    info = studio.state.info
    host, port = sock.getsockname()[:2]
    h, w = info.config.native_size
    source = FLAGS.serving_url or studio.state.backend.version_dir
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"crn-studio: model {info.name!r} version {info.version} ({info.config.name}, {h}x{w}, "
        f"k={info.config.num_outputs}) from {source}\nopen http://{url_host}:{port}/",
        flush=True,
    )
    serve(studio, sock)


def run() -> None:
    """Console-script entry point: `crn-studio`."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
