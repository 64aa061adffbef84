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
    return block("quickstart")


# Paths are paths: every command runs under a folder whose name holds glob characters, spaces and
# non-ASCII letters (TensorFlow's checkpoint and SavedModel readers glob what they are given).
WEIRD_FOLDER = "we[ir]d *dir? ünï"


def block(name: str) -> list[str]:
    """The commands of a marked README block (`<!-- name -->` ... `<!-- /name -->`), without comments."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {name} -->\n```sh\n(.*?)```\n<!-- /{name} -->", text, re.S)
    assert found, f"README.md lost its {name} block"
    return [line.split("#")[0].strip() for line in found.group(1).splitlines() if line.strip()]


def run_command(command: str, folder: pathlib.Path) -> str:
    """A README command with smaller numbers, /tmp/crn replaced by `folder`; a `KEY=value` prefix is
    its environment. Returns its stdout."""
    for big, small in SMALLER.items():
        command = command.replace(big, small)
    argv = shlex.split(command.replace("/tmp/crn", shlex.quote(str(folder))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow")
    while "=" in argv[0]:
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    script = shutil.which(argv[0], path=os.path.dirname(sys.executable))
    argv = [script] + argv[1:] if script else [sys.executable, "-m", MODULES[argv[0]]] + argv[1:]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_readme_quickstart_runs(tmp_path):
    """The quick start as written (smaller numbers), then the "Training on JAX" block on its data:
    `KERAS_BACKEND=jax crn-train`, and TensorFlow's crn-export of what it trained."""
    tmp_path = tmp_path / WEIRD_FOLDER
    commands = quickstart_commands()
    assert [c.split()[0] for c in commands] == [
        "crn-convert", "crn-convert", "crn-train", "crn-eval", "crn-export", "crn-synthesize", "crn-synthesize",
        "crn-studio",
    ]  # fmt: skip
    outputs = {}
    for command in commands[:-1]:  # crn-studio serves until stopped: started in this process below
        outputs[command.split()[0]] = run_command(command, tmp_path)
    assert "backend: tensorflow" in outputs["crn-train"]
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

    # Training on JAX: the README's block, on the quick start's data; TensorFlow exports the result.
    jax_commands = [c for c in block("jax-train") if not c.startswith("pip ")]
    assert [c.split()[:2] for c in jax_commands] == [
        ["KERAS_BACKEND=jax", "crn-train"],
        ["crn-export", "--model_dir=/tmp/crn/tiny_jax"],
    ]
    assert "backend: jax " in run_command(jax_commands[0], tmp_path)
    run_command(jax_commands[1], tmp_path)
    assert (tmp_path / "exports/crn_jax/1/saved_model.pb").exists()
