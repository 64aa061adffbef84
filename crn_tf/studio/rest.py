"""TF Serving's REST JSON conventions for the CRN serving contract: parse and check a predict request,
format its response.

What TF Serving's REST API does, and what this module does too
(https://www.tensorflow.org/tfx/serving/api_rest):
- `{"signature_name": ..., "instances": [...]}` (row format: one element per layout, either a dict of
  named inputs or, for a one-input signature, the bare value) -> `{"predictions": [...]}` (one element
  per layout: the bare value for a single named output, else a dict of outputs);
- `{"signature_name": ..., "inputs": ...}` (columnar: a dict of batched inputs or, for one input, the
  bare batch) -> `{"outputs": ...}` (the bare batch for a single output, else a dict);
- tensors whose name ends in `_bytes` travel as `{"b64": "<base64>"}`; errors are `{"error": "..."}`.

On top, before the model runs, requests are checked against limits with messages that say what to do:
PNG signature, layout size (a positive multiple of the model's size multiple), total layout pixels.
The limits apply before the body becomes Python objects where it matters: `IdCounter` bounds the
label ids of a body while it streams in (no JSON parse of a 32 MB id array), and PNG sizes are read
from each PNG's header before the base64 strings are decoded. Every refusal is a RequestError (4xx).
numpy and the standard library only: the proxy mode (--serving_url) needs no TensorFlow for this.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import struct

import numpy as np

from crn_tf.serving_contract import CONTRACT, LABEL_IDS, LABEL_PNG_BYTES, PNG_MAGIC, SERVING_DEFAULT, fits_size_multiple

# Parts of a TensorFlow error message that say where, not what: "Graph execution error:", the Python
# frames after "Detected at node ...", and the node/op names after the message.
_TF_BOILERPLATE = re.compile(
    r"^(Graph execution error:|Detected at node .*|File \".*|\d+ root error\(s\) found\.?"
    r"|\d+ successful operations\.?.*)$"
)
_TF_LOCATION = re.compile(r"\s*(\[\[\{\{node [^}]*\}\}\]\]|\[Op:[^\]]*\]|\(\d+\) [A-Z_]+:)\s*")
_TF_ASSERTION = re.compile(r"^assertion failed: \[(?P<what>.*)\]$")


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message is shown to the user."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one predict request may ask for.

    Attributes:
        max_request_bytes: largest request body.
        max_pixels: largest total number of layout pixels (sum over the batch).
        size_multiple: layout height and width must be positive multiples of this (the model's).
        native_size: the model's native (height, width), quoted in messages.
        model: the model's config name, quoted in messages.
    """

    max_request_bytes: int
    max_pixels: int
    size_multiple: int
    native_size: tuple[int, int]
    model: str = "crn"


@dataclasses.dataclass
class PredictRequest:
    """A parsed predict request: `inputs` maps the signature's input name to a numpy batch
    (uint8 [N, H, W] for label_ids, object [N] of bytes for label_png_bytes)."""

    signature_name: str
    inputs: dict[str, np.ndarray]
    row_format: bool


def tf_error_message(message: str) -> str:
    """The informative part of a TensorFlow error message, e.g. "Invalid PNG data, size 206" out of
    "Graph execution error:\\n\\nDetected at node ... [[{{node DecodePng}}]] [Op:__inference_...]"."""
    parts = []
    for line in message.splitlines():
        line = _TF_LOCATION.sub(" ", line).strip()
        if not line or _TF_BOILERPLATE.match(line):
            continue
        assertion = _TF_ASSERTION.match(line)
        line = assertion["what"] if assertion else line
        if line not in parts:
            parts.append(line)
    return "; ".join(parts) or message.strip()


def shorten(value, limit: int = 80) -> str:
    """repr() of a client-supplied value, cut to `limit` characters: error messages never echo a whole body."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 14]}... ({len(text)} chars)"


# The ids of a label_ids body are JSON numbers separated by commas: a request with P ids has at most
# P - 1 + (a few structural commas) of them. Counting commas while the body streams in bounds the ids
# before any parse; the slack covers the commas between keys and a few layouts.
_COMMA_SLACK = 64


class IdCounter:
    """Feeds on the chunks of a request body; refuses (413) a body with more label ids than `max_pixels`.

    A PNG request's base64 has no commas, so it never trips this; an id request within the pixel cap
    has at most max_pixels + _COMMA_SLACK commas.
    """

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.commas = 0

    def feed(self, chunk: bytes) -> None:
        self.commas += chunk.count(b",")
        if self.commas > self.max_pixels + _COMMA_SLACK:
            raise RequestError(
                f"request has more than {self.max_pixels} label ids; this server takes at most {self.max_pixels} "
                "layout pixels per request (crn-studio --max_pixels)",
                status=413,
            )


def _b64decode(value, where: str) -> bytes:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise RequestError(
                f'{where}: expected {{"b64": "<base64 string>"}}, got an object with keys {shorten(sorted(value))}'
            )
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{where}: invalid base64 ({e})") from e
    if isinstance(value, str):  # TF Serving takes plain strings for string tensors too
        return value.encode("utf-8")
    raise RequestError(f'{where}: expected {{"b64": "..."}} (a base64-encoded PNG), got {type(value).__name__}')


def _b64_head(value, size: int = 33) -> bytes | None:
    """The first `size` bytes of a {"b64": ...} value without decoding the rest (None if it is not one)."""
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        head = value["b64"][: (size + 2) // 3 * 4]
        try:
            return base64.b64decode(head, validate=True)
        except (binascii.Error, ValueError):
            return None  # the full decode says what is wrong
    return value.encode("utf-8")[:size] if isinstance(value, str) else None


def _to_bytes_batch(values, name: str, limits: Limits | None = None) -> np.ndarray:
    if not isinstance(values, list):
        raise RequestError(f"{name}: expected a list of PNGs, one per layout")
    if limits is not None:  # the pixel cap from the PNG headers, before the PNGs are decoded
        heads = [_b64_head(v) for v in values]
        check_pixels(
            [png_size(h, f"{name}[{i}]") for i, h in enumerate(heads) if h is not None and len(h) >= 24], limits
        )
    out = np.empty(len(values), object)
    for i, v in enumerate(values):
        out[i] = _b64decode(v, f"{name}[{i}]")
    return out


def _to_uint8_batch(values, name: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nested lists, deeper than numpy takes
        raise RequestError(f"{name}: not a rectangular array of label ids ({e})") from e
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise RequestError(f"{name}: label ids must be integers 0..255, got {array.dtype} values")
    if array.ndim != 3:
        raise RequestError(
            f"{name}: expected shape [N, H, W] (a list of H x W id grids), got shape {list(array.shape)}"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise RequestError(f"{name}: label ids must be 0..255 (255 = void), got {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def parse_predict(body: bytes, limits: Limits | None = None) -> PredictRequest:
    """Parses a TF Serving REST predict body for one of the two CRN signatures.

    Args:
        body: the request body (its size already capped, its ids counted: see IdCounter).
        limits: if given, the pixel cap is applied to PNGs from their headers, before decoding them.

    Raises:
        RequestError: malformed JSON or a request that does not fit the serving contract.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not JSON ({e})") from e
    except RecursionError as e:  # the C parser recurses once per nesting level
        raise RequestError("request body is JSON nested too deeply (label ids are [N, H, W]: 3 levels)") from e
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RequestError(f"request body is not usable JSON ({e})") from e
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object with 'instances' or 'inputs'")
    signature_name = request.get("signature_name", SERVING_DEFAULT)
    if not isinstance(signature_name, str):
        raise RequestError(f"'signature_name' must be a string, got {type(signature_name).__name__}")
    if signature_name not in CONTRACT:
        raise RequestError(
            f"Serving signature name: {shorten(signature_name)} not found in signature def "
            f"(this model has {sorted(CONTRACT)})"
        )
    name, rank = CONTRACT[signature_name]
    if "instances" not in request and "inputs" not in request:
        raise RequestError("Missing 'inputs' or 'instances' key")
    if "instances" in request and "inputs" in request:
        raise RequestError("give one of 'inputs' (columnar) and 'instances' (rows), not both")
    row_format = "instances" in request
    if row_format:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list, one element per layout")
        values = []
        for i, instance in enumerate(instances):
            if isinstance(instance, dict) and "b64" not in instance:
                if set(instance) != {name}:
                    raise RequestError(
                        f"instances[{i}]: signature {signature_name!r} takes one input {name!r}, "
                        f"got {shorten(sorted(instance))}"
                    )
                instance = instance[name]
            values.append(instance)
    else:
        values = request["inputs"]
        if isinstance(values, dict) and "b64" not in values:
            if set(values) != {name}:
                raise RequestError(
                    f"inputs: signature {signature_name!r} takes one input {name!r}, got {shorten(sorted(values))}"
                )
            values = values[name]
    batch = _to_bytes_batch(values, name, limits) if rank == 1 else _to_uint8_batch(values, name)
    if len(batch) == 0:
        raise RequestError(f"{name}: empty batch")
    return PredictRequest(signature_name, {name: batch}, row_format)


def png_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk, without decoding it."""
    if not data.startswith(PNG_MAGIC):
        raise RequestError(f"{where}: not a PNG (no PNG signature); send the layout as a PNG of ids or palette colours")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise RequestError(f"{where}: a truncated or corrupt PNG (no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def layout_sizes(request: PredictRequest) -> list[tuple[int, int]]:
    """(height, width) of each layout in the request."""
    if LABEL_IDS in request.inputs:
        n, h, w = request.inputs[LABEL_IDS].shape
        return [(h, w)] * n
    return [png_size(data, f"{LABEL_PNG_BYTES}[{i}]") for i, data in enumerate(request.inputs[LABEL_PNG_BYTES])]


def check_pixels(sizes: list[tuple[int, int]], limits: Limits) -> None:
    """Refuses (413) layouts of more pixels in all than the server takes."""
    total = sum(h * w for h, w in sizes)
    if total > limits.max_pixels:
        raise RequestError(
            f"request has {len(sizes)} layout(s) with {total} pixels in all; this server takes at most "
            f"{limits.max_pixels} per request (crn-studio --max_pixels)",
            status=413,
        )


def check_request(request: PredictRequest, limits: Limits) -> None:
    """Refuses layouts the model cannot take or that exceed the server's pixel budget.

    Raises:
        RequestError: 400 for a non-PNG or a size that is not a multiple of the model's; 413 for too many pixels.
    """
    sizes = layout_sizes(request)
    check_pixels(sizes, limits)
    m = limits.size_multiple
    nh, nw = limits.native_size
    for i, (h, w) in enumerate(sizes):
        if not fits_size_multiple(h, w, m):
            raise RequestError(
                f"layout {i} is {h}x{w}: CRN {limits.model!r} needs height and width that are positive multiples "
                f"of {m} (native size {nh}x{nw})"
            )


def _to_json(name: str, value):
    """A tensor (or one batch element) -> JSON; `*_bytes` tensors as {"b64": ...}, as TF Serving does."""
    if name.endswith("_bytes"):
        if isinstance(value, bytes):
            return {"b64": base64.b64encode(value).decode("ascii")}
        return [_to_json(name, v) for v in value]
    return np.asarray(value).tolist()


def format_predict(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """Model outputs (batched numpy arrays) -> the TF Serving REST response body."""
    names = sorted(outputs)
    if row_format:
        n = len(next(iter(outputs.values())))
        if len(names) == 1:
            return {"predictions": [_to_json(names[0], outputs[names[0]][i]) for i in range(n)]}
        return {"predictions": [{k: _to_json(k, outputs[k][i]) for k in names} for i in range(n)]}
    if len(names) == 1:
        return {"outputs": _to_json(names[0], outputs[names[0]])}
    return {"outputs": {k: _to_json(k, outputs[k]) for k in names}}
