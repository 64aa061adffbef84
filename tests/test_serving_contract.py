"""The serving contract's rules on their own (the exports, crn-synthesize and crn-studio tests use them end to end):
version directories as TF Serving picks them, ONNX file resolution, the size multiple, and the progress bar."""

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from crn_tf import serving_contract as contract
from crn_tf.progress import Progress


def test_version_directories_are_picked_as_tf_serving_picks_them(tmp_path):
    base = tmp_path / "crn"
    for name in ("1", "10", "2", "onnx", "3.tmp-123"):
        (base / name).mkdir(parents=True)
    (base / "10" / "saved_model.pb").write_bytes(b"")
    assert contract.numbered_versions(str(base)) == [1, 2, 10]  # numbers, not names: 10 is newest
    assert contract.numbered_versions(str(tmp_path / "missing")) == []
    assert contract.resolve_version_dir(str(base) + "/") == (f"{base}/10", 10)
    assert contract.resolve_version_dir(f"{base}/10") == (f"{base}/10", 10)  # a version directory itself
    assert contract.resolve_version_dir(str(tmp_path)) == (str(tmp_path), None)  # neither: the caller says so
    config, space = contract.export_asset_paths(f"{base}/10")
    assert config == f"{base}/10/assets.extra/crn_config.json" and space.endswith("assets.extra/label_space.json")


def test_onnx_path_is_the_newest_version_holding_a_model(tmp_path):
    base = tmp_path / "crn"
    for version in (1, 2):
        (base / "onnx" / str(version)).mkdir(parents=True)
    (base / "onnx" / "1" / "model.onnx").write_bytes(b"")  # version 2 is unfinished: no model.onnx
    assert contract.resolve_onnx_path(str(base)) == f"{base}/onnx/1/model.onnx"
    assert contract.resolve_onnx_path(f"{base}/onnx/1") == f"{base}/onnx/1/model.onnx"
    with pytest.raises(ValueError, match=r"--onnx=.*missing: not found"):
        contract.resolve_onnx_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no model.onnx found there"):
        contract.resolve_onnx_path(str(tmp_path / "crn" / "onnx" / "2"))


def test_size_multiple():
    assert contract.fits_size_multiple(16, 32, 4) and contract.fits_size_multiple(4, 4, 4)
    assert not contract.fits_size_multiple(18, 32, 4) and not contract.fits_size_multiple(0, 32, 4)
    assert not contract.fits_size_multiple(2, 2, 4)  # positive multiples only: 0 fits no CRN
    assert contract.SIGNATURE_INPUTS == {"serving_default": "label_ids", "synthesize_png": "label_png_bytes"}


def test_importing_the_contract_needs_no_tensorflow():
    # crn-studio in proxy mode serves without TensorFlow: its modules must not import it.
    code = "import sys, crn_tf.serving_contract, crn_tf.studio.rest; print('tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout == "False\n"


def test_progress_bar_counts_steps_with_losses_and_says_when_done(capsys):  # capsys: stdout is no terminal
    lines = []
    bar = Progress(4, start=2, per_update=8, label="step", log=lambda line, **kwargs: lines.append(line), every=1)
    bar.update(3, {"total": 0.5, "image": 0.25})
    bar.update(4, {"total": 0.25, "image": 0.125})
    assert bar.finish() > 0
    assert lines[0].startswith("[##########----------] step 3/4 loss=0.5 (image=0.25) ")
    assert "images/s, eta" in lines[0] and lines[-1].startswith("done: step 4, 2 steps in ")
    stream = io.StringIO()
    Progress(3, stream=stream, enabled=False).update(3)
    assert stream.getvalue() == ""  # --noprogress draws nothing
