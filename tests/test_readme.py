"""The README's quick start, run as written with smaller numbers (so no README command rots)."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = {  # console script -> module, for environments where the scripts are not on disk
    "crn-convert": "data_tools.convert",
    "crn-train": "crn_tf.train",
    "crn-eval": "crn_tf.evaluate",
    "crn-export": "export.export_saved_model",
    "crn-synthesize": "crn_tf.synthesize",
}
SMALLER = {
    "--count=64": "--count=4",
    "--count=8": "--count=2",
    "--size=128x256": "--size=32x64",
    "--steps=300": "--steps=3",
}


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md lost its quick-start block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


# Paths are paths: every command runs under a folder whose name holds glob characters, spaces and
# non-ASCII letters (TensorFlow's checkpoint and SavedModel readers glob what they are given).
WEIRD_FOLDER = "we[ir]d *dir? ünï"


@pytest.mark.parametrize("train_backend", ["tensorflow", "jax"])
def test_readme_quickstart_runs(tmp_path, train_backend):
    """The quick start as written; then again with `KERAS_BACKEND=jax crn-train` (README: Training on
    JAX): the rest of the commands, on TensorFlow, read the JAX-trained model_dir unchanged."""
    tmp_path = tmp_path / WEIRD_FOLDER
    commands = quickstart_commands()
    assert [c.split()[0] for c in commands] == [
        "crn-convert", "crn-convert", "crn-train", "crn-eval", "crn-export", "crn-synthesize", "crn-synthesize",
        "crn-studio",
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    outputs = {}
    for command in commands[:-1]:  # crn-studio serves until stopped: started in this process below
        for big, small in SMALLER.items():
            command = command.replace(big, small)
        argv = shlex.split(command.replace("/tmp/crn", shlex.quote(str(tmp_path))))
        script = shutil.which(argv[0], path=os.path.dirname(sys.executable))
        argv = [script] + argv[1:] if script else [sys.executable, "-m", MODULES[argv[0]]] + argv[1:]
        backend = train_backend if argv[0].endswith("crn-train") or "crn_tf.train" in argv else "tensorflow"
        result = subprocess.run(
            argv, cwd=ROOT, env=dict(env, KERAS_BACKEND=backend), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs[command.split()[0]] = result.stdout
    assert f"backend: {train_backend}" in outputs["crn-train"]
    assert (tmp_path / "tiny/eval_val.json").exists()
    assert (tmp_path / "exports/crn/1/saved_model.pb").exists() and (tmp_path / "exports/crn/onnx/1").is_dir()
    assert len(list((tmp_path / "photos").glob("*.png"))) == 7 == len(list((tmp_path / "photos_onnx").glob("*.png")))
    exported = outputs["crn-export"]
    assert f"{tmp_path}/exports/crn/onnx/1 (version 1, ONNX opset 17" in exported and "trtexec --onnx=" in exported
    # The ONNX photos are the SavedModel's (the right half of each `layout | photo` grid), within 1 grey
    # level: two runtimes' float kernels sum in different orders, which can move a value across rounding.
    for onnx_png in sorted((tmp_path / "photos_onnx").glob("*.png")):
        onnx_photo = np.asarray(Image.open(onnx_png), np.int16)
        grid = np.asarray(Image.open(tmp_path / "photos" / onnx_png.name), np.int16)
        assert onnx_photo.shape == (16, 32, 3) and grid.shape == (16, 64, 3)
        assert np.abs(grid[:, 32:] - onnx_photo).max() <= 1, onnx_png.name
    # crn-studio, from the README's own --saved_model, in this process (its flags only reach create_app).
    saved_model = re.search(r"--saved_model=(\S+)", commands[-1]).group(1).replace("/tmp/crn", str(tmp_path))
    from crn_tf.studio.server import BackgroundServer, create_app

    with BackgroundServer(create_app(saved_model)) as url:
        body = json.dumps({"inputs": {"label_ids": np.zeros([1, 16, 32], np.uint8).tolist()}}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models/crn:predict", body), timeout=60) as r:
            assert np.asarray(json.loads(r.read())["outputs"], np.uint8).shape == (1, 16, 32, 3)
