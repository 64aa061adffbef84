"""crn-export: signatures, the TF1-loader check, warmup requests, atomic versioned directories.

Two tiny models (k=1 and k=2) are exported once per module; everything that must run in a fresh
process (the TF1 loader, as TF Serving loads a SavedModel, and saved_model_cli) is batched into two
subprocesses.
"""

import io
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from conftest import CITYSCAPES_256P, GTA_PALETTE, random_ids
from PIL import Image

from crn_tf import labels
from crn_tf.config import get_preset
from crn_tf.model import build_model
from crn_tf.model_dir import save_model_dir
from crn_tf.synthesize import synthesize_ids
from export import saved_model as export_lib
from export.tf1_check import WARMUP_FILE, read_warmup_requests, request_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACE = labels.get_label_space("cityscapes")


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png16_bytes(ids) -> list[bytes]:
    """The layout `ids` [H, W] as a 16-bit grey PNG and a 16-bit RGB PNG (its colours * 257)."""
    rgb = labels.ids_to_colors(ids, SPACE).astype(np.uint16) * 257
    return [png_bytes(ids.astype(np.uint16)), tf.io.encode_png(tf.constant(rgb)).numpy()]


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def read_bytes(path) -> bytes:
    return pathlib.Path(path).read_bytes()


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def snapshot(root: pathlib.Path) -> dict:
    """Every file under root with its bytes, and every directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{k: (model, version dir)} for tiny Cityscapes models with k = 1 and k = 2, exported once."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for k in (1, 2):
        tf.keras.utils.set_random_seed(k)
        model = build_model(get_preset("tiny", num_outputs=k))
        result = export_lib.export_saved_model(model, str(root / f"crn_k{k}"))
        assert result.version == 1 and result.export_dir == str(root / f"crn_k{k}" / "1")
        out[k] = (model, result)
    return out


# Runs in a fresh process: loads each export with the TF1 loader (TF Serving's way) and runs the
# given requests, errors included (recorded, not raised), then the export's warmup requests.
TF1_SCRIPT = r"""
import pickle, sys
from export.tf1_check import TF1Model, run_warmup
with open(sys.argv[1], "rb") as f:
    jobs = pickle.load(f)
results = {}
for export_dir, cases in jobs.items():
    model = TF1Model(export_dir)
    names = {n: (sorted(s.inputs), sorted(s.outputs)) for n, s in model.signatures.items()}
    results[export_dir] = {"signatures": names}
    for name, signature, inputs in cases:
        try:
            results[export_dir][name] = model.run(signature, inputs)
        except Exception as e:
            results[export_dir][name] = ("error", type(e).__name__, str(e))
    results[export_dir]["warmup"] = run_warmup(export_dir)
with open(sys.argv[2], "wb") as f:
    pickle.dump(results, f)
"""


def tf1_cases():
    ids = random_ids((2, 16, 32), seed=3)
    ids[0, :4] = 19  # ids >= num_classes are void, as 255
    ids[0, 4:8] = 200
    layouts = [read_bytes(p) for p in CITYSCAPES_256P[:2]] + [read_bytes(GTA_PALETTE)]
    good = ("good", "serving_default", {"label_ids": ids})
    return (
        ids,
        layouts,
        [
            good,
            ("png_real", "synthesize_png", {"label_png_bytes": np.array(layouts[:1], object)}),
            ("png_palette", "synthesize_png", {"label_png_bytes": np.array(layouts[2:], object)}),
            ("png_ids", "synthesize_png", {"label_png_bytes": np.array([png_bytes(ids[1])], object)}),
            ("bad_rank", "serving_default", {"label_ids": ids[..., None]}),
            ("bad_size", "serving_default", {"label_ids": ids[:, :10]}),
            ("bad_png", "synthesize_png", {"label_png_bytes": np.array([b"not a png"], object)}),
            ("truncated_png", "synthesize_png", {"label_png_bytes": np.array([layouts[0][:200]], object)}),
            ("bad_png_size", "synthesize_png", {"label_png_bytes": np.array([png_bytes(ids[0, :10])], object)}),
            # decode_png(dtype=uint8) keeps the high byte: ids 0..18 would all be 0, a photo of road.
            ("png_16bit", "synthesize_png", {"label_png_bytes": np.array(png16_bytes(ids[1])[:1], object)}),
            ("png_16bit_rgb", "synthesize_png", {"label_png_bytes": np.array(png16_bytes(ids[1])[1:], object)}),
            ("after_errors", "serving_default", {"label_ids": ids}),
        ],
    )


@pytest.fixture(scope="module")
def tf1_results(exports, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf1")
    ids, layouts, cases = tf1_cases()
    jobs = {result.export_dir: cases for _, result in exports.values()}
    (tmp / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "-c", TF1_SCRIPT, str(tmp / "jobs.pkl"), str(tmp / "results.pkl")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ids, layouts, pickle.loads((tmp / "results.pkl").read_bytes())


def keras_images(model, ids) -> np.ndarray:
    """uint8 [N, k, H, W, 3] from the Keras model."""
    return synthesize_ids(model, np.asarray(ids)).numpy()


def assert_close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1


def test_version_directory_layout(exports):
    for k, (_, result) in exports.items():
        base = pathlib.Path(result.export_dir).parent
        assert sorted(p.name for p in base.iterdir()) == ["1"]  # no temporary directory left
        files = {str(p.relative_to(result.export_dir)) for p in pathlib.Path(result.export_dir).rglob("*")}
        assert {"saved_model.pb", "variables", WARMUP_FILE, "assets.extra/crn_config.json"} <= files
        assert result.max_abs_diff <= 1
        config = (base.parent / "models.config").read_text()
        assert f'name: "crn_k{k}"' in config and f'base_path: "/models/crn_k{k}"' in config
    # Both exports share one models.config beside their bases, one entry each.
    assert (base.parent / "models.config").read_text().count("config {") == 2
    assert export_lib.next_version(str(base)) == 2


def test_tf1_loader_serving_default_matches_keras(exports, tf1_results):
    ids, _, results = tf1_results
    for k, (model, result) in exports.items():
        got = results[result.export_dir]
        outputs = ["image", "images"] if k > 1 else ["image"]
        assert got["signatures"]["serving_default"] == (["label_ids"], outputs)
        assert got["signatures"]["synthesize_png"] == (["label_png_bytes"], ["image_png_bytes"])
        expected = keras_images(model, ids)  # [2, k, 16, 32, 3]
        assert_close(got["good"]["image"], expected[:, 0])
        if k > 1:
            assert_close(got["good"]["images"], expected)
        # Ids >= num_classes are void: the same image as with 255 there.
        void = np.where(ids >= 19, 255, ids).astype(np.uint8)
        assert_close(got["good"]["image"], keras_images(model, void)[:, 0])


def test_tf1_loader_synthesize_png_matches_keras(exports, tf1_results):
    ids, layouts, results = tf1_results
    for model, result in exports.values():
        got = results[result.export_dir]
        for name, layout in (("png_real", layouts[0]), ("png_palette", layouts[2])):
            (photo,) = got[name]["image_png_bytes"]
            photo = decode_png(photo)
            assert photo.shape == (256, 512, 3)  # same size as the layout
            layout_ids = labels.decode_label_image(layout, SPACE)
            assert_close(photo, keras_images(model, layout_ids[None])[0, 0])
        (photo,) = got["png_ids"]["image_png_bytes"]  # a single-channel id PNG
        assert_close(decode_png(photo), keras_images(model, ids[1:])[0, 0])


def test_tf1_loader_bad_inputs_fail_clearly_and_the_session_survives(exports, tf1_results):
    ids, _, results = tf1_results
    for model, result in exports.values():
        got = results[result.export_dir]
        kind, error_type, message = got["bad_rank"]
        assert kind == "error" and error_type == "ValueError" and "shape" in message
        for name in ("bad_size", "bad_png_size"):
            kind, error_type, message = got[name]
            assert error_type == "InvalidArgumentError" and "multiples of 4" in message, message
        kind, error_type, message = got["bad_png"]
        assert error_type == "InvalidArgumentError" and "label_png_bytes" in message and "not a PNG" in message
        kind, error_type, message = got["truncated_png"]
        assert error_type == "InvalidArgumentError" and "Invalid PNG data, size 200" in message, message
        for name in ("png_16bit", "png_16bit_rgb"):  # refused in-graph: TF Serving refuses them too
            kind, error_type, message = got[name]
            assert error_type == "InvalidArgumentError" and "a 16-bit PNG; layouts must be 8-bit" in message, message
        assert_close(got["after_errors"]["image"], keras_images(model, ids)[:, 0])


def test_warmup_requests_parse_and_run(exports, tf1_results):
    _, _, results = tf1_results
    for k, (model, result) in exports.items():
        logs = read_warmup_requests(f"{result.export_dir}/{WARMUP_FILE}")
        assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
            "serving_default",
            "synthesize_png",
        ]
        assert {log.predict_log.request.model_spec.name for log in logs} == {f"crn_k{k}"}
        signature, inputs = request_inputs(logs[0])
        assert inputs["label_ids"].shape == (1, 16, 32) and inputs["label_ids"].dtype == np.uint8
        assert set(np.unique(inputs["label_ids"])) == set(range(19)) | {255}  # every class and void
        warmup = results[result.export_dir]["warmup"]
        assert_close(warmup["0/serving_default/image"], keras_images(model, inputs["label_ids"])[:, 0])
        colour_png, id_png = warmup["1/synthesize_png/image_png_bytes"]
        assert_close(decode_png(colour_png), decode_png(id_png))  # colour and id PNG of one layout


def test_saved_model_cli_lists_the_documented_signatures(exports):
    _, result = exports[2]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run(
        [cli, "show", "--dir", result.export_dir, "--all"], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for expected in (
        "signature_def['serving_default']: The given SavedModel SignatureDef contains the following input(s): "
        "inputs['label_ids'] tensor_info: dtype: DT_UINT8 shape: (-1, -1, -1)",
        "outputs['image'] tensor_info: dtype: DT_UINT8 shape: (-1, -1, -1, 3)",
        "outputs['images'] tensor_info: dtype: DT_UINT8 shape: (-1, 2, -1, -1, 3)",
        "signature_def['synthesize_png']: The given SavedModel SignatureDef contains the following input(s): "
        "inputs['label_png_bytes'] tensor_info: dtype: DT_STRING shape: (-1)",
        "outputs['image_png_bytes'] tensor_info: dtype: DT_STRING shape: (-1)",
        "Method name is: tensorflow/serving/predict",
    ):
        assert expected in text, proc.stdout


def test_tf2_loaded_export_real_layouts_and_bad_inputs(exports):
    """In-process tf.saved_model.load: every sample layout through synthesize_png; bad calls raise."""
    model, result = exports[1]
    loaded = tf.saved_model.load(result.export_dir)
    png = loaded.signatures["synthesize_png"]
    layouts = [read_bytes(p) for p in CITYSCAPES_256P] + [read_bytes(GTA_PALETTE)]
    photos = png(label_png_bytes=tf.constant(layouts))["image_png_bytes"].numpy()
    assert len(photos) == len(layouts)
    for layout, photo in zip(layouts, photos):
        photo = decode_png(photo)
        assert photo.shape == (256, 512, 3)
        assert_close(photo, keras_images(model, labels.decode_label_image(layout, SPACE)[None])[0, 0])
    serve = loaded.signatures["serving_default"]
    ids = random_ids((1, 16, 32))
    bad_call = (TypeError, ValueError, tf.errors.InvalidArgumentError)  # what a signature wrapper raises
    with pytest.raises(bad_call, match="uint8"):
        serve(label_ids=tf.constant(ids, tf.float32))  # wrong dtype
    with pytest.raises(bad_call, match=r"label_ids.*\[16,32\].*expected shape \[\?,\?,\?\]"):
        serve(label_ids=tf.constant(ids[0]))  # wrong rank
    with pytest.raises(bad_call, match=r"label_png_bytes.*expected shape \[\?\]"):
        png(label_png_bytes=tf.constant([[b"x"]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 4"):
        serve(label_ids=tf.constant(random_ids((1, 18, 32))))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a PNG"):
        png(label_png_bytes=tf.constant([b"GIF89a..."]))
    for png16 in png16_bytes(ids[0]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="label_png_bytes: an element is a 16-bit PNG"):
            png(label_png_bytes=tf.constant([png16]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG"):  # shorter than its header
        png(label_png_bytes=tf.constant([b"\x89PNG\r\n\x1a\n\0\0"]))
    assert_close(serve(label_ids=tf.constant(ids))["image"].numpy(), keras_images(model, ids)[:, 0])


def test_existing_version_is_kept_unless_overwrite(exports, tmp_path, monkeypatch):
    model, _ = exports[1]
    monkeypatch.setattr(export_lib, "verify_export", lambda export_dir, model: 0)  # tested elsewhere; saves 5 s
    base = tmp_path / "crn"
    (base / "3").mkdir(parents=True)
    (base / "3" / "keep").write_text("old export")
    with pytest.raises(ValueError, match=r"3 exists; pass --overwrite"):
        export_lib.export_saved_model(model, str(base), version=3)
    assert snapshot(base) == {"3": None, "3/keep": b"old export"}
    result = export_lib.export_saved_model(model, str(base), version=3, overwrite=True)
    assert result.version == 3 and (base / "3" / "saved_model.pb").exists() and not (base / "3" / "keep").exists()
    assert sorted(p.name for p in base.iterdir()) == ["3"]
    assert export_lib.next_version(str(base)) == 4


def test_interrupted_export_leaves_the_base_as_it_was(exports, tmp_path, monkeypatch):
    model, result = exports[1]
    base = tmp_path / "crn"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"version one")
    (tmp_path / "models.config").write_text("model_config_list {}\n")
    before = snapshot(tmp_path)
    written = []

    def fail(export_dir, model):
        written.extend(p.name for p in pathlib.Path(export_dir).iterdir())
        raise KeyboardInterrupt  # as if interrupted after the files were written

    monkeypatch.setattr(export_lib, "verify_export", fail)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export_saved_model(model, str(base))
    assert "saved_model.pb" in written and "assets.extra" in written
    assert snapshot(tmp_path) == before
    # A base that did not exist is not left behind either.
    with pytest.raises(KeyboardInterrupt):
        export_lib.export_saved_model(model, str(tmp_path / "new" / "crn"))
    assert not (tmp_path / "new" / "crn").exists()


def test_failed_tf1_check_leaves_no_version_directory(exports, tmp_path, monkeypatch):
    model, _ = exports[1]
    temp = tmp_path / "temp"  # the temporary directory of this process and of its check process
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(export_lib, "MAX_ABS_DIFF", -1)  # any difference, even 0, now fails the real check
    with pytest.raises(export_lib.ExportVerificationError, match="differs from the Keras model"):
        export_lib.export_saved_model(model, str(tmp_path / "crn"))
    assert list(tmp_path.iterdir()) == [temp]
    assert list(temp.iterdir()) == []  # the check's results came through a pipe (crn_export_check_* stayed)


def test_bad_arguments(exports, tmp_path):
    model, _ = exports[1]
    with pytest.raises(ValueError, match="multiples of 4"):
        export_lib.export_saved_model(model, str(tmp_path / "crn"), warmup_size=(18, 32))
    with pytest.raises(ValueError, match="--version must be a positive integer"):
        export_lib.export_saved_model(model, str(tmp_path / "crn"), version=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_model_dir_and_prints_serving_commands(exports, tmp_path, capsys):
    from export import export_saved_model as cli

    model, _ = exports[2]
    save_model_dir(model, str(tmp_path / "model"), step=7)
    argv = ["crn-export", f"--model_dir={tmp_path / 'model'}", f"--export_base={tmp_path / 'exports/crn'}"]
    cli.define_flags()
    cli.FLAGS(argv + ["--warmup_size=8x16"])
    try:
        cli.main(argv[:1])
    finally:
        cli.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert (tmp_path / "exports/crn/1/saved_model.pb").exists()
    assert f'-v "{tmp_path / "exports"}:/models" tensorflow/serving' in out
    assert "--model_config_file=/models/models.config" in out
    assert "http://localhost:8501/v1/models/crn:predict" in out and '"signature_name": "synthesize_png"' in out
    assert "PredictionServiceStub" in out and "np.zeros([1, 8, 16], np.uint8)" in out
    log = read_warmup_requests(str(tmp_path / "exports/crn/1" / WARMUP_FILE))[0]
    assert request_inputs(log)[1]["label_ids"].shape == (1, 8, 16)


def _fake_writes(monkeypatch, delay_s=0.3):
    """Exports that write a marker naming their thread instead of a SavedModel, slowly (a wide race
    window), and skip the check (tested above): concurrency tests in threads, without TensorFlow work."""
    import threading
    import time

    def write(model, tmp_dir, model_name, warmup_size):
        os.makedirs(tmp_dir)
        time.sleep(delay_s)
        pathlib.Path(tmp_dir, "writer").write_text(threading.current_thread().name)

    monkeypatch.setattr(export_lib, "_write_version", write)
    monkeypatch.setattr(export_lib, "verify_export", lambda export_dir, model: 0)


def _run_threads(target, n):
    """Runs target(i) in n threads at once; returns {thread name: result or exception}."""
    import threading

    results = {}

    def run(i):
        try:
            results[f"w{i}"] = target(i)
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            results[f"w{i}"] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"w{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_exports_get_distinct_versions(exports, tmp_path, monkeypatch):
    """Before the version claims, four exports that overlapped all wrote version 1 and three were lost."""
    model, _ = exports[1]
    _fake_writes(monkeypatch)
    base = tmp_path / "crn"
    results = _run_threads(lambda i: export_lib.export_saved_model(model, str(base)).version, 4)
    assert sorted(results.values()) == [1, 2, 3, 4], results
    for name, version in results.items():
        assert (base / str(version) / "writer").read_text() == name  # each export's own files
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1", "2", "3", "4", "crn", "models.config"] + ["writer"] * 4


def test_a_version_is_never_replaced_without_overwrite_even_in_a_race(exports, tmp_path, monkeypatch):
    model, _ = exports[1]
    _fake_writes(monkeypatch)
    base = tmp_path / "crn"
    results = _run_threads(lambda i: export_lib.export_saved_model(model, str(base), version=5).version, 2)
    winners = [name for name, r in results.items() if r == 5]
    (loser,) = [r for r in results.values() if r != 5]
    assert len(winners) == 1 and (base / "5" / "writer").read_text() == winners[0]
    assert isinstance(loser, ValueError) and "crn/5" in str(loser)
    assert "being written by another crn-export (pid" in str(loser) or "exists; pass --overwrite" in str(loser)
    # A directory that appears after the claim (a process that takes no claim) is not replaced either.

    def write_then_compete(model, tmp_dir, model_name, warmup_size):
        os.makedirs(tmp_dir)
        (base / "6").mkdir()  # empty: a plain rename(2) would silently replace it

    monkeypatch.setattr(export_lib, "_write_version", write_then_compete)
    with pytest.raises(ValueError, match="crn/6 appeared while this export was being written"):
        export_lib.export_saved_model(model, str(base), version=6)
    assert sorted(p.name for p in base.iterdir()) == ["5", "6"] and not list((base / "6").iterdir())


def test_stale_temporaries_of_dead_exports_are_removed_and_only_those(exports, tmp_path, monkeypatch):
    from export import versions

    model, _ = exports[1]
    _fake_writes(monkeypatch, delay_s=0)
    base = tmp_path / "crn"
    (base / "1").mkdir(parents=True)
    # A killed export of version 2: its temporary folder and lock file (the lock died with it).
    (base / "2.tmp-4242-0badf00d" / "variables").mkdir(parents=True)
    (base / "2.lock").write_text("pid 4242 on elsewhere\n")
    # A killed --overwrite of version 3, between moving the old version aside and renaming the new in.
    (base / "3.tmp-4243-0badcafe.old").mkdir()
    (base / "3.tmp-4243-0badcafe.old" / "saved_model.pb").write_text("old version 3")
    (base / "3.tmp-4243-1badcafe").mkdir()
    # A live export writing version 7: its claim is held, its folder must stay.
    live = versions.claim_version(str(base), 7)
    (base / "7.tmp-1-00c0ffee").mkdir()
    (base / "notes.txt").write_text("not ours")
    try:
        result = export_lib.export_saved_model(model, str(base))
        assert result.version == 4  # after 1 and the restored 3
        assert sorted(p.name for p in base.iterdir()) == ["1", "3", "4", "7.lock", "7.tmp-1-00c0ffee", "notes.txt"]
        assert (base / "3" / "saved_model.pb").read_text() == "old version 3"
        with pytest.raises(
            versions.VersionInUseError, match=rf"crn/7 is being written by another crn-export \(pid {os.getpid()}"
        ):
            export_lib.export_saved_model(model, str(base), version=7)
    finally:
        live.release()
    assert not (base / "7.lock").exists()


def test_the_check_process_ends_with_its_parent(tmp_path):
    """SIGKILL the exporting process mid-check: its check process exits too (it used to run on)."""
    import signal
    import time

    parent_code = (
        "from export.child import run_child\n"
        "run_child('timeit', ['-n', '1', '-r', '1', 'import time; time.sleep(120)'])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=subprocess_env())
    children_file = pathlib.Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 30
    while not children_file.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child_pid,) = map(int, children_file.read_text().split())
    time.sleep(0.5)  # let the child start its watcher (it sleeps in timeit after)

    def alive(pid):
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")  # a zombie has exited

    assert alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child_pid)
