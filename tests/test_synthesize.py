"""crn-synthesize and crn_tf.synthesize: layout files -> photos from a checkpoint or a SavedModel."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import CITYSCAPES_PAIRS, EXAMPLE_LAYOUTS, GTA_PALETTE
from PIL import Image

from crn_tf import labels
from crn_tf.config import get_preset, parse_size
from crn_tf.model import build_model
from crn_tf.model_dir import save_model_dir
from crn_tf.synthesize import (
    SynthesisOptions,
    Synthesizer,
    _batches,
    list_layouts,
    synthesize_files,
    synthesize_ids,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACE = labels.get_label_space("cityscapes")


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def keras_photo(model, ids) -> np.ndarray:
    """uint8 [H, W, 3]: the first image for one layout of ids [H, W]."""
    return synthesize_ids(model, ids[None]).numpy()[0, 0]


def assert_close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Cityscapes model (k=1) as a model_dir and as an export, and some layout files."""
    from export.saved_model import export_saved_model

    root = tmp_path_factory.mktemp("synth")
    tf.keras.utils.set_random_seed(0)
    model = build_model(get_preset("tiny"))
    save_model_dir(model, str(root / "model"), step=1)
    result = export_saved_model(model, str(root / "exports/crn"))
    layouts = root / "layouts"
    layouts.mkdir()
    shutil.copy(EXAMPLE_LAYOUTS / "cityscapes_256p_00100027.png", layouts / "city.png")  # RGB colours
    shutil.copy(GTA_PALETTE, layouts / "gta.png")  # palette mode
    shutil.copy(CITYSCAPES_PAIRS / "aachen_000000_000019_gtFine_color.png", layouts / "aachen.png")  # RGBA
    ids = labels.read_label_image(str(layouts / "city.png"), SPACE)
    Image.fromarray(ids[:64, :128]).save(layouts / "ids.png")  # single-channel ids, another size
    return model, root, result.export_dir, layouts


def test_same_image_through_keras_both_signatures_and_the_cli(setup, tmp_path):
    model, root, export_dir, layouts = setup
    path = layouts / "gta.png"
    ids = labels.read_label_image(str(path), SPACE)  # [256, 512]
    expected = keras_photo(model, ids)
    loaded = tf.saved_model.load(export_dir)
    served = loaded.signatures["serving_default"](label_ids=tf.constant(ids[None]))["image"].numpy()[0]
    assert_close(served, expected)
    png = loaded.signatures["synthesize_png"](label_png_bytes=tf.constant([path.read_bytes()]))
    assert_close(tf.io.decode_png(png["image_png_bytes"][0]).numpy(), expected)

    # The CLI, from the SavedModel, then again without --overwrite: a one-line error, exit status 1.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "crn_tf.synthesize", f"--saved_model={export_dir}"]
    command += [f"--layouts={path},{layouts / 'city.png'}", f"--output_dir={tmp_path}", "--batch_size=2"]
    script = f"{' '.join(command)} && {' '.join(command)}"
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "wrote 2 file(s)" in proc.stdout
    assert f"crn-synthesize: {tmp_path / 'gta.png'} exists; pass --overwrite to replace it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["city.png", "gta.png"]
    assert_close(read_png(tmp_path / "gta.png"), expected)

    # The library from the model_dir (checkpoint): the same image again.
    written = synthesize_files(
        Synthesizer.from_model_dir(str(root / "model")),
        [str(path)],
        SynthesisOptions(output_dir=str(tmp_path / "ckpt")),
        progress=False,
    )
    assert written == [str(tmp_path / "ckpt" / "gta.png")]
    assert_close(read_png(written[0]), expected)


def test_colour_palette_rgba_and_id_layouts_keep_their_names_and_sizes(setup, tmp_path):
    model, _, export_dir, layouts = setup
    paths = list_layouts(str(layouts))
    assert [pathlib.Path(p).name for p in paths] == ["aachen.png", "city.png", "gta.png", "ids.png"]
    options = SynthesisOptions(output_dir=str(tmp_path), batch_size=3)
    written = synthesize_files(Synthesizer.from_saved_model(export_dir), paths, options, progress=False)
    assert [pathlib.Path(p).name for p in written] == ["aachen.png", "city.png", "gta.png", "ids.png"]
    for path, out in zip(paths, written):
        ids = labels.read_label_image(path, SPACE)
        photo = read_png(out)
        assert photo.shape == ids.shape + (3,)
        assert_close(photo, keras_photo(model, ids))


def test_layout_paths_with_glob_characters_are_taken_literally(setup, tmp_path):
    """`run[1]/` used to be read as the pattern `run1/`: "matches no layout file"."""
    _, _, _, layouts = setup
    folder = tmp_path / "run[1]"
    shutil.copytree(layouts, folder)
    (folder / "odd[x].png").write_bytes((layouts / "ids.png").read_bytes())
    (folder / "notes.txt").write_text("not a layout")
    names = ["aachen.png", "city.png", "gta.png", "ids.png", "odd[x].png"]
    assert [pathlib.Path(p).name for p in list_layouts(str(folder))] == names  # a folder
    assert list_layouts(f"{folder}/*.png") == list_layouts(f"{folder}/")  # a pattern in a literal folder
    assert list_layouts(str(folder / "odd[x].png")) == [str(folder / "odd[x].png")]  # an existing file
    assert list_layouts(f"{folder}/[ag]*.png") == [str(folder / "aachen.png"), str(folder / "gta.png")]
    assert list_layouts(f"{tmp_path}/run*/c*.png") == [str(folder / "city.png")]  # a pattern in the folder part
    with pytest.raises(ValueError, match=r"--layouts entry .*run\[2\].* matches no layout file"):
        list_layouts(str(tmp_path / "run[2]"))


def test_existing_outputs_are_kept_unless_overwrite(setup, tmp_path):
    model, _, _, layouts = setup
    synthesizer = Synthesizer.from_model(model)
    (tmp_path / "ids.png").write_bytes(b"keep me")
    options = SynthesisOptions(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path / 'ids.png'} exists; pass --overwrite"):
        synthesize_files(synthesizer, [str(layouts / "ids.png")], options, progress=False)
    assert (tmp_path / "ids.png").read_bytes() == b"keep me"
    options = SynthesisOptions(output_dir=str(tmp_path), overwrite=True)
    synthesize_files(synthesizer, [str(layouts / "ids.png")], options, progress=False)
    assert read_png(tmp_path / "ids.png").shape == (64, 128, 3)


def test_invalid_size_names_the_file_and_the_multiple_unless_resized(setup, tmp_path):
    model, _, _, layouts = setup
    synthesizer = Synthesizer.from_model(model)
    bad = tmp_path / "bad.png"
    Image.fromarray(np.zeros((30, 64), np.uint8)).save(bad)
    options = SynthesisOptions(output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=f"{bad}: layout is 30x64, .*multiples of 4.*--resize=HxW"):
        synthesize_files(synthesizer, [str(layouts / "ids.png"), str(bad)], options, progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything was synthesized
    options = SynthesisOptions(output_dir=str(tmp_path / "out"), resize=parse_size("32x64"))
    (out,) = synthesize_files(synthesizer, [str(bad)], options, progress=False)
    assert read_png(out).shape == (32, 64, 3)
    with pytest.raises(ValueError, match="--resize: layout is 30x60"):
        synthesize_files(synthesizer, [str(bad)], SynthesisOptions(str(tmp_path), resize=(30, 60)), progress=False)
    with pytest.raises(ValueError, match="not HxW"):
        parse_size("256")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=f"{corrupt}: not a readable image"):
        synthesize_files(synthesizer, [str(corrupt)], options, progress=False)


def test_diverse_model_writes_the_collection_and_grids(setup, tmp_path):
    _, _, _, layouts = setup
    model = build_model(get_preset("tiny", num_outputs=2))
    synthesizer = Synthesizer.from_model(model)
    path = str(layouts / "ids.png")
    ids = labels.read_label_image(path, SPACE)  # [64, 128]
    collection = synthesize_ids(model, ids[None]).numpy()[0]  # [2, 64, 128, 3]
    written = synthesize_files(synthesizer, [path], SynthesisOptions(str(tmp_path), num_outputs=2), progress=False)
    assert [pathlib.Path(p).name for p in written] == ["ids_0.png", "ids_1.png"]
    for u, out in enumerate(written):
        assert_close(read_png(out), collection[u])
    (grid,) = synthesize_files(
        synthesizer, [path], SynthesisOptions(str(tmp_path / "grid"), num_outputs=2, grid=True), progress=False
    )
    grid = read_png(grid)
    assert grid.shape == (64, 3 * 128, 3)
    np.testing.assert_array_equal(grid[:, :128], labels.ids_to_colors(ids, SPACE))  # layout | photo 0 | photo 1
    assert_close(grid[:, 256:], collection[1])
    with pytest.raises(ValueError, match="--num_outputs=3, but .* synthesizes 2 image"):
        synthesize_files(synthesizer, [path], SynthesisOptions(str(tmp_path), num_outputs=3), progress=False)


def test_list_layouts_and_batching(setup, tmp_path):
    _, _, _, layouts = setup
    assert list_layouts(f"{layouts}/c*.png,{layouts / 'ids.png'}") == [
        str(layouts / "city.png"),
        str(layouts / "ids.png"),
    ]
    with pytest.raises(ValueError, match="'nowhere/\\*.png' matches no layout file"):
        list_layouts("nowhere/*.png")
    with pytest.raises(ValueError, match="matches no layout file"):
        list_layouts(str(tmp_path))  # an empty folder
    # Consecutive layouts of one size share a batch of at most batch_size.
    assert list(_batches([1, 1, 1, 2, 1], key=lambda x: x, batch_size=2)) == [[1, 1], [1], [2], [1]]
