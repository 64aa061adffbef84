"""ONNX export (`crn-export --format=onnx`), onnxruntime against Keras, and `crn-synthesize --onnx`.

One tiny model is exported once per module (conversion, the fresh-process onnxruntime check); an
imported original-style TF1 model (align_corners upsampling, k = 9 head permutation) is converted
in-process. The CLIs run once each in a subprocess.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import EXAMPLE_LAYOUTS, random_ids

onnx = pytest.importorskip("onnx", reason="the `onnx` extra (tf2onnx, onnx, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")

from crn_tf import convert_original, labels  # noqa: E402
from crn_tf.config import get_preset  # noqa: E402
from crn_tf.model import build_model, split_outputs  # noqa: E402
from crn_tf.model_dir import load_model, save_model_dir  # noqa: E402
from crn_tf.synthesize import Synthesizer, synthesize_ids, to_uint8  # noqa: E402
from export import onnx_export  # noqa: E402
from export.export_saved_model import parse_formats  # noqa: E402
from export.saved_model import ExportVerificationError, next_version  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACE = labels.get_label_space("cityscapes")
# The ops the converted generator may use: all standard opset-17 ops that TensorRT 8.6+ parses. A new
# op here (a tf2onnx or model change) should be a conscious decision, not a surprise on a TensorRT host.
GENERATOR_OPS = {
    "Add", "AveragePool", "Cast", "Concat", "Conv", "Gather", "LeakyRelu", "Mul", "Neg", "Reciprocal",
    "ReduceMean", "Reshape", "Resize", "Shape", "Slice", "Sqrt", "Sub", "Transpose",
}  # fmt: skip


def session(path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1


def layout_ids(shape, seed):
    """Random train ids with void (255) and out-of-range ids (19, 200: void as well)."""
    ids = random_ids(shape, seed=seed)
    ids[:, :2, :4] = 19
    ids[:, 2:4, :4] = 200
    return ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, model_dir, export base, OnnxExportResult) for the tiny Cityscapes model, k = 1."""
    root = tmp_path_factory.mktemp("onnx")
    tf.keras.utils.set_random_seed(0)
    model = build_model(get_preset("tiny"))
    save_model_dir(model, str(root / "model"), step=1)
    result = onnx_export.export_onnx(model, str(root / "exports/crn"))
    return model, root / "model", root / "exports/crn", result


def test_version_directory_files_and_metadata(exported):
    model, _, base, result = exported
    assert result.export_dir == f"{base}/onnx/1" and result.version == 1 and result.opset == 17
    assert sorted(p.name for p in base.iterdir()) == ["onnx"]  # TF Serving sees no version here
    assert next_version(str(base)) == 1 and onnx_export.next_version(f"{base}/onnx") == 2
    assert sorted(p.name for p in (base / "onnx").iterdir()) == ["1"]  # no temporary directory left
    assert sorted(p.name for p in (base / "onnx/1").iterdir()) == ["generator.onnx", "model.onnx"]
    assert result.max_abs_diff <= 1 and result.max_float_diff <= 1e-3
    nhw = ["batch", "height", "width"]
    signatures = {
        "model.onnx": ("label_ids", ("label_ids", 2, nhw), ("image", 2, [*nhw, 3])),
        "generator.onnx": ("layout", ("layout", 1, [*nhw, 20]), ("image", 1, [*nhw, 3])),
    }
    for name, (graph, input_, output) in signatures.items():
        proto = onnx.load(str(base / "onnx/1" / name))
        assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 17)}
        props = {p.key: p.value for p in proto.metadata_props}
        assert props["crn_graph"] == graph
        assert props["crn_config"] and '"name": "tiny"' in props["crn_config"]
        assert labels.LabelSpace.from_json(props["label_space"]).palette == SPACE.palette

        def describe(value):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            return value.name, value.type.tensor_type.elem_type, dims

        # elem_type 2 = UINT8, 1 = FLOAT; N, H, W dynamic and named
        assert [describe(v) for v in proto.graph.input] == [input_]
        assert [describe(v) for v in proto.graph.output] == [output]
        resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
        assert len(resizes) == 2  # one per upsampling; mode as the original's resize_bilinear(align_corners=True)
        for node in resizes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["coordinate_transformation_mode"] == b"align_corners" and attrs["mode"] == b"linear"
        for node in proto.graph.node:  # layer-norm statistics one axis at a time (_split_multi_axis_means)
            if node.op_type == "ReduceMean":
                (axes,) = [a.ints for a in node.attribute if a.name == "axes"]
                assert len(axes) == 1, node
        if name == "generator.onnx":
            assert {n.op_type for n in proto.graph.node} <= GENERATOR_OPS  # no Assert: the size check is dropped


def test_onnxruntime_matches_keras_at_two_sizes_from_one_file(exported):
    model, _, base, _ = exported
    ids_graph, generator = session(base / "onnx/1/model.onnx"), session(base / "onnx/1/generator.onnx")
    for seed, (h, w) in enumerate([(16, 32), (32, 64)]):
        ids = layout_ids((2, h, w), seed)
        layout = labels.one_hot(ids, 19).numpy()  # [2, H, W, 20]
        keras_float = model(layout).numpy()
        (onnx_float,) = generator.run(["image"], {"layout": layout})
        assert onnx_float.shape == (2, h, w, 3)
        assert np.max(np.abs(onnx_float - keras_float)) <= 1e-3
        expected = synthesize_ids(model, ids).numpy()[:, 0]  # [2, H, W, 3] uint8
        assert_close(to_uint8(onnx_float).numpy(), expected)
        (image,) = ids_graph.run(["image"], {"label_ids": ids})
        assert_close(image, expected)


def test_imported_original_model_with_k9_head(tmp_path, monkeypatch):
    """The authors' TF1 generator (align_corners, k = 9 head permutation) -> import -> ONNX matches it.

    Converted the way paper-width models are (one optimizer pass per fresh graph), so both ways are tested.
    """
    monkeypatch.setattr(onnx_export, "IN_PLACE_OPTIMIZATION_MAX_BYTES", 0)
    from test_convert_original import _save_original

    prefix, layout, original = _save_original(tmp_path, {4: 16, 8: 16, 16: 12, 32: 8}, k=9, batch=1, seed=2)
    convert_original.import_original(prefix, str(tmp_path / "imported"))
    model = load_model(str(tmp_path / "imported"))
    assert model.crn_config.upsampling == "align_corners" and model.crn_config.num_outputs == 9
    generator = session_from_proto(onnx_export.convert(model, "layout"))
    (onnx_float,) = generator.run(["image"], {"layout": layout})  # [1, 32, 64, 27]
    np.testing.assert_allclose(onnx_float, model(layout).numpy(), atol=1e-3 * np.abs(original).max())
    images = split_outputs(onnx_float, 9).numpy()[0]  # [9, 32, 64, 3]: the original's batch axis holds the k images
    assert np.max(np.abs(images - original)) / np.max(np.abs(original)) < 1e-4
    ids = np.argmax(layout, axis=-1).astype(np.uint8)  # channel 19 = void
    ids_graph = session_from_proto(onnx_export.convert(model, "label_ids"))
    image, collection = ids_graph.run(["image", "images"], {"label_ids": ids})
    expected = synthesize_ids(model, ids).numpy()  # [1, 9, 32, 64, 3]
    assert_close(collection, expected)
    assert_close(image, expected[:, 0])


def session_from_proto(proto) -> "ort.InferenceSession":
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture
def cached_conversion(exported, monkeypatch):
    """export_onnx without tf2onnx's 2 x 2 s: `convert` returns the module export's protos."""
    _, _, base, _ = exported
    protos = {graph: onnx.load(str(base / "onnx/1" / name)) for graph, name in onnx_export.FILES.items()}
    monkeypatch.setattr(onnx_export, "convert", lambda model, graph: protos[graph])


def snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_failed_verification_leaves_nothing_behind(exported, cached_conversion, tmp_path, monkeypatch):
    model = exported[0]
    monkeypatch.setattr(onnx_export, "MAX_ABS_DIFF", -1)  # any difference, even 0, now fails the real check
    with pytest.raises(ExportVerificationError, match=r"onnx/1\.tmp-.*/model\.onnx: output 'image' .* differs"):
        onnx_export.export_onnx(model, str(tmp_path / "exports/crn"))
    assert list(tmp_path.iterdir()) == []  # not even the base that did not exist


def test_unloadable_file_fails_the_check(exported, cached_conversion, tmp_path, monkeypatch):
    model = exported[0]
    monkeypatch.setattr(onnx_export, "write_onnx", lambda proto, path: pathlib.Path(path).write_bytes(b"not onnx"))
    with pytest.raises(ExportVerificationError, match="onnxruntime failed to load or run"):
        onnx_export.export_onnx(model, str(tmp_path / "crn"))
    assert list(tmp_path.iterdir()) == []


def test_existing_version_is_kept_unless_overwrite_and_interrupts_restore_it(
    exported, cached_conversion, tmp_path, monkeypatch
):
    model = exported[0]
    base = tmp_path / "crn"
    (base / "1").mkdir(parents=True)  # a SavedModel version: untouched throughout
    (base / "1" / "saved_model.pb").write_bytes(b"savedmodel")
    (base / "onnx/1").mkdir(parents=True)
    (base / "onnx/1/model.onnx").write_bytes(b"old onnx")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"onnx/1 exists; pass --overwrite"):
        onnx_export.export_onnx(model, str(base), version=1)

    def interrupted(export_dir, model, warmup_size):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "verify_onnx_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model, str(base), version=1, overwrite=True)
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(onnx_export, "verify_onnx_export", lambda export_dir, model, warmup_size: (0, 0.0))
    result = onnx_export.export_onnx(model, str(base))
    assert result.version == 2 and (base / "onnx/2/generator.onnx").exists()
    result = onnx_export.export_onnx(model, str(base), version=1, overwrite=True)
    assert sorted(p.name for p in (base / "onnx/1").iterdir()) == ["generator.onnx", "model.onnx"]
    assert sorted(p.name for p in (base / "onnx").iterdir()) == ["1", "2"]
    with pytest.raises(ValueError, match="--warmup_size=18x32: .*multiples of 4"):
        onnx_export.export_onnx(model, str(base), warmup_size=(18, 32))


class IgammaModel:
    """Stands in for a CRN whose graph has an op without ONNX form (tf.math.igamma)."""

    crn_config = get_preset("tiny")

    def __call__(self, layout):
        return tf.math.igamma(layout[..., :3] + 1.0, layout[..., :3] + 2.0)


def test_op_without_onnx_form_is_named_and_nothing_is_written(tmp_path):
    message = r"TensorFlow op\(s\) Igamma have no ONNX form in tf2onnx 1\.17.*\(CRN 'tiny', .* graph, opset 17\)"
    with pytest.raises(onnx_export.OnnxConversionError, match=message):
        onnx_export.export_onnx(IgammaModel(), str(tmp_path / "crn"))
    assert list(tmp_path.iterdir()) == []


def test_synthesizer_from_onnx(exported, tmp_path):
    model, _, base, result = exported
    ids = layout_ids((2, 32, 64), seed=5)
    expected = synthesize_ids(model, ids).numpy()  # [2, 1, 32, 64, 3]
    for path in (base, base / "onnx", result.export_dir, result.files["layout"]):
        synthesizer = Synthesizer.from_onnx(str(path))
        assert synthesizer.num_outputs == 1 and synthesizer.size_multiple == 4
        assert synthesizer.label_space.palette == SPACE.palette
        assert_close(synthesizer(ids), expected)
    assert Synthesizer.from_onnx(str(base)).source == f"{base}/onnx/1/model.onnx"
    synthesizer = Synthesizer.from_onnx(str(base))
    with pytest.raises(ValueError, match=r"model\.onnx: layout is 18x64, .*multiples of 4"):
        synthesizer(ids[:, :18])
    with pytest.raises(ValueError, match=r"--onnx=.*nowhere: not found"):
        Synthesizer.from_onnx(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no model.onnx found there"):
        Synthesizer.from_onnx(str(tmp_path))
    identity = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    identity.ir_version = 8
    (tmp_path / "other.onnx").write_bytes(identity.SerializeToString())
    with pytest.raises(ValueError, match="other.onnx: not an ONNX file written by crn-export"):
        Synthesizer.from_onnx(str(tmp_path / "other.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.onnx: onnxruntime cannot load it"):
        Synthesizer.from_onnx(str(tmp_path / "broken.onnx"))


def test_format_flag_values():
    assert parse_formats(["onnx"]) == ["onnx"]
    assert parse_formats(["onnx", "saved_model", "onnx"]) == ["saved_model", "onnx"]
    with pytest.raises(ValueError, match="--format=tflite: expected one or more of saved_model, onnx"):
        parse_formats(["tflite"])


def test_crn_export_cli_onnx_only(exported, tmp_path):
    """`crn-export --format=onnx` alone (tests/test_readme.py runs `--format=saved_model,onnx` and
    `crn-synthesize --onnx` from the README, and checks the ONNX photos against the SavedModel's)."""
    model, model_dir, _, _ = exported
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    base = tmp_path / "exports/crn"
    command = [sys.executable, "-m", "export.export_saved_model", f"--model_dir={model_dir}"]
    proc = subprocess.run(
        [*command, f"--export_base={base}", "--format=onnx", "--version=4"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Exported {base}/onnx/4 (version 4, ONNX opset 17" in proc.stdout
    assert "trtexec --onnx=" in proc.stdout and "--minShapes=layout:1x16x32x20" in proc.stdout
    assert sorted(p.name for p in base.iterdir()) == ["onnx"]  # no SavedModel unless asked for
    # The written model computes the Keras model's photo (onnxruntime, in this process).
    session = ort.InferenceSession(str(base / "onnx/4/model.onnx"), providers=["CPUExecutionProvider"])
    layout = EXAMPLE_LAYOUTS / "cityscapes_256p_00100027.png"
    ids = labels.read_label_image(str(layout), SPACE)[None, :16, :32]
    assert_close(session.run(["image"], {"label_ids": ids})[0][0], synthesize_ids(model, ids).numpy()[0, 0])
