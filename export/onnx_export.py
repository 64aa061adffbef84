"""ONNX export of a CRN for runtimes beyond TensorFlow (onnxruntime, TensorRT, ...): versioned, verified, atomic.

`export_onnx(model, "exports/crn")` writes `exports/crn/onnx/<version>/`:

    model.onnx       `label_ids` uint8 [N, H, W] -> `image` uint8 [N, H, W, 3]
                     (+ `images` uint8 [N, k, H, W, 3] for diverse models): the SavedModel's
                     `serving_default` (one-hot, generator, clip and round, all in the graph)
    generator.onnx   `layout` float32 [N, H, W, C] (one-hot, void channel last) -> `image` float32
                     [N, H, W, 3k] in about [0, 255]: the network alone, for TensorRT and friends

N, H and W are dynamic (named `batch`, `height`, `width`). Both files carry the CRNConfig and the
label space as ONNX metadata (`crn_config`, `label_space`; `crn_graph` says which graph a file holds),
so `crn-synthesize --onnx` needs nothing else.

Why `<export_base>/onnx/<version>/`: one model's exports stay under one base directory (copy or
delete it as a whole), ONNX version v holds the same weights as SavedModel version v when both are
exported together, and TF Serving ignores `onnx/` (not an integer), as it ignores the temporary
`<version>.tmp-...` directories. A directory per version holds both graphs and is renamed into place
in one step, like the SavedModel, after a fresh process has run both files with onnxruntime on the
warmup layout and matched the Keras model within 1 grey level.

Opset 17 (`OPSET`): the opset TensorRT 8.6 (still the TensorRT of many Jetson and Triton images)
targets; TensorRT 10 and onnxruntime take it too. tf2onnx 1.17 goes up to 18, which changes nothing
this graph uses; it needs >= 11 (Resize with `align_corners`). The model's size check (a
tf.debugging.Assert, only a control dependency) has no ONNX form and is not converted: callers check
sizes (Synthesizer.from_onnx does).

Why this module drives tf2onnx itself instead of Keras' own `model.export(path, format="onnx")` (which
calls tf2onnx's `from_function` with its default pipeline), measured on 2026-12-01 on the 2-core, 24 GB
development machine with Keras 3.15 / tf2onnx 1.17 / onnxruntime 1.32 (script: build the preset's model,
`model.export(..., format="onnx", input_signature=[float32 [None, None, None, C]])`, run it with onnxruntime
on a random one-hot layout, compare with the Keras model):
- `tiny` at 32x64: converts in 1.1 s (0.65 GB peak resident), but tf2onnx's transpose optimizer crashes on
  the head's scalar `+ 1` (onnx/tensorflow-onnx#1729, "max() arg is an empty sequence") and is skipped;
  the graph matches Keras within 7.3e-4 (1 grey level after rounding).
- `cityscapes_256p` (paper width): killed by the kernel's OOM killer after 3 min at 22 GB resident
  (`/usr/bin/time -v`: maximum resident set size 23,081,052 kB; `free -g` said 15 GB available when it
  started, and a test run shared the machine), before it printed a result. Not profiled further; the
  likely cause is the one `_optimize` documents (in-place passes keeping a copy of all weights per pass).
It would also give only the float generator (no uint8 `label_ids` graph, no metadata, tf2onnx's
`unk__N` dimension names) and skip `_split_multi_axis_means`, without which onnxruntime's ReduceMean was
off by up to 12 grey levels at paper width. So the private pipeline stays, pinned to tf2onnx 1.17
(`optimizer._get_optimizers` is private): a newer tf2onnx must pass tests/test_onnx.py before the pin moves.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import posixpath
import subprocess

import numpy as np
import tensorflow as tf

from crn_tf import labels
from crn_tf.serving_contract import (
    ONNX_CONFIG_KEY,
    ONNX_DIR,
    ONNX_FILENAMES,
    ONNX_GRAPH_KEY,
    ONNX_GRAPH_LABEL_IDS,
    ONNX_GRAPH_LAYOUT,
    ONNX_LABEL_SPACE_KEY,
)
from crn_tf.serving_graph import synthesize_ids, to_uint8
from export import child
from export.saved_model import (
    MAX_ABS_DIFF,
    VERIFY_TIMEOUT_S,
    ExportVerificationError,
    check_warmup_size,
    next_version,  # noqa: F401 - onnx_export.next_version(onnx_base(...)) for callers
    warmup_label_ids,
    write_version_atomically,
)

OPSET = 17
MODEL_FILE, GENERATOR_FILE = ONNX_FILENAMES  # label ids in, uint8 image out (Triton's default file name);
# one-hot float in, float RGB out
FILES = {ONNX_GRAPH_LABEL_IDS: MODEL_FILE, ONNX_GRAPH_LAYOUT: GENERATOR_FILE}
INSTALL_HINT = "pip install 'crn_tf[onnx]' (tf2onnx, onnx, onnxruntime)"

# Dynamic dimensions get these names in the graphs' inputs and outputs (tf2onnx makes up `unk__N`).
_DIM_NAMES = ("batch", "height", "width")


class OnnxConversionError(ValueError):
    """tf2onnx could not convert the model (e.g. an op with no ONNX form at `OPSET`)."""


@dataclasses.dataclass(frozen=True)
class OnnxExportResult:
    """What `export_onnx` wrote.

    Attributes:
        export_dir: the version directory, `<export_base>/onnx/<version>`.
        version: the version number.
        files: {graph: path}: `label_ids` -> model.onnx, `layout` -> generator.onnx.
        opset: the ONNX opset of both graphs.
        warmup_size: (height, width) of the verification layout.
        max_abs_diff: largest difference (grey levels) of either graph's uint8 image from the Keras model's.
        max_float_diff: largest absolute difference of generator.onnx's float output from the Keras model's.
        input_channels: C of generator.onnx's `layout` input (classes + void).
        size_multiple: layout height and width must be multiples of this (not checked in the graphs).
    """

    export_dir: str
    version: int
    files: dict[str, str]
    opset: int
    warmup_size: tuple[int, int]
    max_abs_diff: int
    max_float_diff: float
    input_channels: int
    size_multiple: int


def _import_converter():
    try:
        import onnx
        import tf2onnx
    except ImportError as e:
        raise ImportError(f"ONNX export needs tf2onnx and onnx ({e}); {INSTALL_HINT}") from e
    return onnx, tf2onnx


def check_dependencies() -> None:
    """Raises an ImportError saying what to install unless tf2onnx, onnx and onnxruntime import."""
    _import_converter()
    try:
        import onnxruntime  # noqa: F401  (the verification runs it)
    except ImportError as e:
        raise ImportError(f"verifying the ONNX export needs onnxruntime ({e}); {INSTALL_HINT}") from e


def _scalar_add_constants_as_vectors(graph) -> None:
    """Gives every scalar constant added to a tensor the shape [1] (same broadcast, same values).

    tf2onnx 1.17's transpose optimizer crashes on a scalar Add right after a Conv (our output head's
    `+ 1`; onnx/tensorflow-onnx#1729); `from_function` catches that and carries on without the pass,
    `_optimize` (catch_errors=False) would fail. With shape [1] the pass runs cleanly.
    """
    for node in graph.get_nodes():
        if node.type != "Add" or len(node.input) != 2:
            continue
        for index, source in enumerate(node.inputs):
            if source is not None and source.is_const() and source.get_tensor_value(as_list=False).shape == ():
                value = source.get_tensor_value(as_list=False).reshape([1])
                vector = graph.make_const(f"{source.name}_as_vector", value)
                graph.replace_input(node, node.input[index], vector.output[0], index)


def _split_multi_axis_means(proto) -> None:
    """Replaces each ReduceMean over several axes (keepdims) by a chain of one-axis ReduceMeans.

    The layer norm's statistics are means over H, W and C at once: 67M terms per image at 256x512 with
    512 channels. onnxruntime 1.32's CPU ReduceMean sums such a reduction far less accurately than
    TensorFlow: the paper-width model's image was off by up to 12 grey levels (32 before rounding,
    where TensorFlow float32 stays within 0.002 of float64). A mean of means over one axis at a time
    (equal counts, so the same value) sums at most max(H, W, C) terms each and matches TensorFlow.
    """
    import onnx

    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = list(attrs.get("axes", []))
        if node.op_type != "ReduceMean" or len(axes) < 2 or not attrs.get("keepdims", 1):
            nodes.append(node)
            continue
        source = node.input[0]
        for i, axis in enumerate(axes):
            target = node.output[0] if i == len(axes) - 1 else f"{node.name}/axis{axis}"
            name = f"{node.name}/{i}"
            nodes.append(onnx.helper.make_node("ReduceMean", [source], [target], name=name, axes=[axis], keepdims=1))
            source = target
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


_MAX_OPTIMIZER_ROUNDS = 8
# Up to this many bytes of weights, the passes run in place (tf2onnx's way: faster, a few copies of the
# weights); above it, one pass per fresh graph (see _optimize).
IN_PLACE_OPTIMIZATION_MAX_BYTES = 256 << 20


def _optimize(proto):
    """tf2onnx's optimizer passes (constant folding, transposes, identities, ...) until nothing changes.

    `tf2onnx.optimizer.optimize_graph` runs them all on one graph, whose nodes re-serialise their
    attributes after every pass; with protobuf's upb backend (protobuf >= 4, 7.x with TF 2.21) the
    replaced copies stay in the node protos' arenas, so every pass keeps another copy of all weights:
    over 10 GB for the paper-width models (390 MB of weights). Here each pass gets a graph built from a
    fresh ModelProto (GraphUtil.optimize_model_proto), and the previous graph is collected at once (its
    nodes and graph reference each other, so only the cycle collector frees them): about 3.5 GB
    resident, ~5.5 GB at peak, ~4 s per pass for cityscapes_256p. Small models (up to
    IN_PLACE_OPTIMIZATION_MAX_BYTES) take tf2onnx's faster way, all passes on one graph.
    """
    from tf2onnx import optimizer
    from tf2onnx.graph import GraphUtil

    passes = optimizer._get_optimizers()  # tf2onnx's own list and order
    if proto.ByteSize() <= IN_PLACE_OPTIMIZATION_MAX_BYTES:
        return GraphUtil.optimize_model_proto(proto, catch_errors=False, optimizers=passes)
    for _ in range(_MAX_OPTIMIZER_ROUNDS):
        before = collections.Counter(node.op_type for node in proto.graph.node)
        for name, factory in passes.items():
            proto = GraphUtil.optimize_model_proto(proto, catch_errors=False, optimizers={name: factory})
            gc.collect()
        if collections.Counter(node.op_type for node in proto.graph.node) == before:
            break
    return proto


def _graph_function(model, graph: str):
    """(tf.function, input signature) of one exported graph."""
    config = model.crn_config
    if graph == ONNX_GRAPH_LAYOUT:
        spec = tf.TensorSpec([None, None, None, config.input_channels], tf.float32, name="layout")

        def generator(layout):
            return {"image": model(layout)}  # [N, H, W, 3k] float

        return tf.function(generator), spec
    if graph == ONNX_GRAPH_LABEL_IDS:
        spec = tf.TensorSpec([None, None, None], tf.uint8, name="label_ids")

        def serving(label_ids):
            images = synthesize_ids(model, label_ids)  # [N, k, H, W, 3] uint8
            outputs = {"image": images[:, 0]}
            if config.num_outputs > 1:
                outputs["images"] = images
            return outputs

        return tf.function(serving), spec
    raise ValueError(f"unknown ONNX graph {graph!r}; choose one of {sorted(FILES)}")


def _name_dynamic_dims(proto) -> None:
    """Names the inputs' and outputs' dynamic dimensions batch / (k) / height / width."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        names = _DIM_NAMES if len(dims) in (3, 4) else ("batch", None, *_DIM_NAMES[1:])  # [N, k, H, W, 3]
        for dim, name in zip(dims, names):
            if name and not dim.HasField("dim_value"):
                dim.dim_param = name


def convert(model, graph: str):
    """Converts one graph of a CascadedRefinementNetwork to an ONNX ModelProto (in memory).

    Args:
        model: the generator.
        graph: `label_ids` (uint8 ids -> uint8 images) or `layout` (one-hot float -> float RGB).

    Returns:
        An `onnx.ModelProto` at opset `OPSET`, with the config and label space in its metadata.

    Raises:
        ImportError: tf2onnx / onnx are not installed.
        OnnxConversionError: tf2onnx failed, e.g. on an op with no ONNX form.
    """
    onnx, tf2onnx = _import_converter()
    from tf2onnx import tf_loader, tfonnx
    from tf2onnx.convert import tensor_names_from_structed

    config = model.crn_config
    fn, spec = _graph_function(model, graph)
    try:
        # tf2onnx.convert.from_function's steps, with two changes: an op without ONNX form raises here
        # (from_function leaves it in the graph, continue_on_error=True), and the optimizer passes run
        # one at a time on fresh protos (_optimize).
        concrete = fn.get_concrete_function(spec)
        inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
        outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
        renames = tensor_names_from_structed(concrete, inputs, outputs)  # -> label_ids / layout, image(s)
        with tf.device("/cpu:0"):
            frozen = tf_loader.from_function(concrete, inputs, outputs)
        with tf.Graph().as_default() as tf_graph:
            tf.import_graph_def(frozen, name="")
            onnx_graph = tfonnx.process_tf_graph(
                tf_graph,
                opset=OPSET,
                input_names=inputs,
                output_names=outputs,
                tensors_to_rename=renames,
                continue_on_error=False,
            )
            _scalar_add_constants_as_vectors(onnx_graph)
            proto = onnx_graph.make_model(f"crn {config.name} {graph}")
        del onnx_graph, frozen
        gc.collect()
        unconverted = sorted({n.op_type for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain)})
        if unconverted:  # tf2onnx logs these and keeps the TensorFlow op in the graph
            raise OnnxConversionError(
                f"TensorFlow op(s) {', '.join(unconverted)} have no ONNX form in tf2onnx {tf2onnx.__version__} "
                f"(CRN {config.name!r}, {graph} graph, opset {OPSET})"
            )
        proto = _optimize(proto)
        _split_multi_axis_means(proto)
        onnx.checker.check_model(proto)
    except OnnxConversionError:
        raise
    except Exception as e:  # tf2onnx and the checker raise many types for unsupported ops and shapes
        raise OnnxConversionError(
            f"tf2onnx {tf2onnx.__version__} could not convert CRN {config.name!r} ({graph} graph) to ONNX "
            f"opset {OPSET}: {type(e).__name__}: {e}"
        ) from e
    _name_dynamic_dims(proto)
    proto.producer_name = "crn_tf (tf2onnx)"
    proto.doc_string = (
        f"Cascaded Refinement Network {config.name!r}, k={config.num_outputs}: "
        + (
            "label_ids uint8 [N, H, W] -> image uint8 [N, H, W, 3]"
            if graph == ONNX_GRAPH_LABEL_IDS
            else f"layout float32 [N, H, W, {config.input_channels}] (one-hot, void last) -> image float32 "
            f"[N, H, W, {3 * config.num_outputs}]"
        )
        + f"; H and W multiples of {config.size_multiple} (not checked in the graph)"
    )
    space = config.get_label_space()
    onnx.helper.set_model_props(
        proto,
        {
            ONNX_GRAPH_KEY: graph,
            ONNX_CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True),
            ONNX_LABEL_SPACE_KEY: space.to_json(),
        },
    )
    return proto


def write_onnx(proto, path: str) -> None:
    """Serializes an ONNX ModelProto to `path` (any tf.io.gfile path)."""
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(proto.SerializeToString())


def run_onnx_check(export_dir: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs both graphs of an ONNX version directory with onnxruntime in a fresh Python process
    (export.child: it ends with this process; inputs and outputs travel through pipes, not files)."""
    try:
        status, out, err = child.run_child(
            "export.onnx_check", [export_dir, "-", "-"], stdin=child.npz_bytes(inputs), timeout_s=VERIFY_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise ExportVerificationError(f"{export_dir}: the onnxruntime check took over {VERIFY_TIMEOUT_S} s") from e
    if status != 0:
        raise ExportVerificationError(
            f"{export_dir}: onnxruntime failed to load or run the ONNX export (exit {status}):\n{err[-4000:]}"
        )
    return child.read_npz(out)


def _max_diff(have: np.ndarray, want: np.ndarray) -> int:
    return int(np.max(np.abs(have.astype(np.int32) - want.astype(np.int32)), initial=0))


def verify_onnx_export(export_dir: str, model, warmup_size: tuple[int, int]) -> tuple[int, float]:
    """Checks that both ONNX graphs, run by onnxruntime in a fresh process, give the Keras model's images
    on the warmup layout.

    Returns:
        (largest uint8 difference in grey levels, largest float difference of generator.onnx's output).

    Raises:
        ExportVerificationError: a graph did not load or run, an output is missing or has the wrong
            shape or type, or an image differs by more than MAX_ABS_DIFF grey levels.
    """
    config = model.crn_config
    ids = warmup_label_ids(warmup_size, config.num_classes)[None]  # [1, H, W] uint8
    layout = labels.one_hot(ids, config.num_classes).numpy()  # [1, H, W, C + 1]
    results = run_onnx_check(export_dir, {"label_ids": ids, "layout": layout})
    keras_float = model(layout).numpy()  # [1, H, W, 3k]
    collection = synthesize_ids(model, ids).numpy()  # [1, k, H, W, 3]
    expected = {
        f"{ONNX_GRAPH_LABEL_IDS}/image": collection[:, 0],
        f"{ONNX_GRAPH_LAYOUT}/image": keras_float,
    }
    if config.num_outputs > 1:
        expected[f"{ONNX_GRAPH_LABEL_IDS}/images"] = collection
    worst, float_diff = 0, 0.0
    for name, want in expected.items():
        graph, output = name.split("/")
        have = results.get(name)
        if have is None or have.shape != want.shape or have.dtype != want.dtype:
            raise ExportVerificationError(
                f"{export_dir}/{FILES[graph]}: output {output!r} on the warmup layout is "
                f"{None if have is None else (have.shape, str(have.dtype))}, expected {want.dtype} {want.shape}"
            )
        if have.dtype != np.uint8:
            float_diff = float(np.max(np.abs(have - want)))
            have, want = to_uint8(have).numpy(), to_uint8(want).numpy()  # the contract is on uint8 images
        diff = _max_diff(have, want)
        if diff > MAX_ABS_DIFF:
            raise ExportVerificationError(
                f"{export_dir}/{FILES[graph]}: output {output!r} on the warmup layout differs from the Keras "
                f"model by up to {diff} grey levels (allowed {MAX_ABS_DIFF})"
            )
        worst = max(worst, diff)
    return worst, float_diff


def onnx_base(export_base: str) -> str:
    """Where the ONNX versions of `export_base` go: `<export_base>/onnx`."""
    return f"{export_base.rstrip('/')}/{ONNX_DIR}"


def export_onnx(
    model,
    export_base: str,
    version: int | None = None,
    warmup_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> OnnxExportResult:
    """Exports `model` (a CascadedRefinementNetwork) to `export_base/onnx/<version>/` (model.onnx, generator.onnx).

    Args:
        model: the generator to export.
        export_base: the model's base directory (as for the SavedModel; created if needed).
        version: version number; default: one more than the largest existing ONNX version (or 1).
        warmup_size: (height, width) of the verification layout; default: the model's native size.
        overwrite: replace an existing version directory instead of refusing.

    Returns:
        An OnnxExportResult.

    Raises:
        ImportError: tf2onnx / onnx / onnxruntime are not installed.
        ValueError: bad version or warmup size, or the version exists and `overwrite` is False.
        OnnxConversionError: tf2onnx could not convert the model; nothing was written.
        ExportVerificationError: the onnxruntime check failed; nothing was left behind.
    """
    check_dependencies()
    config = model.crn_config
    export_base = export_base.rstrip("/")
    if not posixpath.basename(export_base):
        raise ValueError(f"--export_base={export_base!r} needs a final directory name: the model's name")
    warmup_size = check_warmup_size(config, warmup_size)
    base = onnx_base(export_base)
    if version is not None and version < 1:
        raise ValueError(f"--version must be a positive integer, got {version}")
    if version is not None and tf.io.gfile.exists(f"{base}/{version}") and not overwrite:  # before converting
        raise ValueError(
            f"{base}/{version} exists; pass --overwrite to replace that version or choose another --version"
        )
    protos = {graph: convert(model, graph) for graph in FILES}  # before touching the file system

    def write_and_verify(tmp_dir: str) -> tuple[int, float]:
        tf.io.gfile.makedirs(tmp_dir)
        for graph, proto in protos.items():
            write_onnx(proto, f"{tmp_dir}/{FILES[graph]}")
        return verify_onnx_export(tmp_dir, model, warmup_size)

    version, (max_diff, float_diff) = write_version_atomically(
        base, write_and_verify, version, overwrite, created_parents=(export_base,)
    )
    final_dir = f"{base}/{version}"
    files = {graph: f"{final_dir}/{name}" for graph, name in FILES.items()}
    return OnnxExportResult(
        final_dir, version, files, OPSET, warmup_size, max_diff, float_diff, config.input_channels, config.size_multiple
    )


def onnx_instructions(result: OnnxExportResult) -> str:
    """How to run the export: crn-synthesize, onnxruntime from Python, trtexec for TensorRT."""
    h, w = result.warmup_size
    c = result.input_channels
    model_file, generator_file = result.files[ONNX_GRAPH_LABEL_IDS], result.files[ONNX_GRAPH_LAYOUT]
    return f"""Exported {result.export_dir} (version {result.version}, ONNX opset {result.opset}; onnxruntime check: \
max difference {result.max_abs_diff} grey level(s), {result.max_float_diff:.2g} before rounding, from the Keras model)
  {model_file}: label_ids uint8 [N, H, W] -> image uint8 [N, H, W, 3]
  {generator_file}: layout float32 [N, H, W, C] one-hot -> image float32 [N, H, W, 3k]

Synthesize photos with onnxruntime:
crn-synthesize --onnx={result.export_dir} --layouts=layouts/ --output_dir=photos

Python:
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("{model_file}", providers=["CPUExecutionProvider"])
(image,) = session.run(["image"], {{"label_ids": np.zeros([1, {h}, {w}], np.uint8)}})  # uint8 [1, {h}, {w}, 3]

TensorRT (dynamic shapes: widen min/max to the sizes you serve, H and W multiples of {result.size_multiple}):
trtexec --onnx={generator_file} --minShapes=layout:1x{h}x{w}x{c} --optShapes=layout:1x{h}x{w}x{c} \\
    --maxShapes=layout:4x{h}x{w}x{c} --saveEngine=crn.plan
"""
