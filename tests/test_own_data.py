"""Your own data end to end: a label space no preset knows -> crn-convert -> crn-train --preset=tiny (no class
flag) -> crn-export -> synthesize_png with a colour layout of that palette, the palette file deleted after
conversion; and a SIGKILLed deterministic run that resumes to weights bit-identical to an uninterrupted one."""

import dataclasses
import io
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from crn_tf import data, labels
from crn_tf.model_dir import load_model
from crn_tf.synthesize import Synthesizer
from data_tools import common, folder
from export.saved_model import export_saved_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEACH = labels.LabelSpace(
    "beach7",
    ["sand", "sea", "sky", "rock", "person", "umbrella", "towel"],
    [(230, 210, 150), (20, 90, 160), (130, 190, 240), (110, 100, 90), (200, 60, 60), (250, 160, 0), (60, 200, 90)],
)
STEPS = 12


def _layout(rng, h=16, w=32):
    ids = np.zeros([h, w], np.uint8)  # sand
    ids[: h // 3] = 2  # sky
    ids[h // 3 : h // 2] = 1  # sea
    for _ in range(3):
        y, x = rng.integers(h // 2, h - 3), rng.integers(0, w - 4)
        ids[y : y + 3, x : x + 4] = rng.integers(3, 7)
    ids[-1, -1] = 255  # a void pixel (black in the colour layout)
    return ids


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """8 colour-layout/photo pairs in the beach7 palette, converted; the palette JSON is then deleted."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for i in range(8):
        ids = _layout(rng)
        photo = np.clip(BEACH.color_table()[ids] * 0.9 + rng.normal(0, 6, ids.shape + (3,)), 0, 255)
        for sub, array in (("images", photo.astype(np.uint8)), ("labels", labels.ids_to_colors(ids, BEACH))):
            (root / "pairs" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / "pairs" / sub / f"beach_{i}.png")
    palette = root / "beach7.json"
    palette.write_text(BEACH.to_json())
    source = folder.make_source(str(root / "pairs"), "colors", str(palette))
    common.convert(source, str(root / "tfr"), "train")
    palette.unlink()  # from here on, only the data and the models know the classes
    return root


def _crn_train(own_data, model_dir, steps):
    args = [sys.executable, "-m", "crn_tf.train", "--preset=tiny", f"--data_dir={own_data / 'tfr'}"]
    args += [f"--model_dir={model_dir}", f"--steps={steps}", "--batch_size=2", "--loss=image", "--deterministic"]
    args += ["--checkpoint_every=4", "--keep_checkpoints=100", "--image_every=100000", "--summary_every=100000"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(model_dir):
    state = tf.train.get_checkpoint_state(str(model_dir))
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] if state else []


@pytest.fixture(scope="module")
def runs(own_data):
    """An uninterrupted STEPS-step run, and the same run SIGKILLed after its first checkpoint, then resumed in
    the background (the export test runs meanwhile; the bit-identity test waits for it)."""
    whole, killed = own_data / "whole", own_data / "killed"
    reference = _crn_train(own_data, whole, STEPS)
    victim = _crn_train(own_data, killed, 100_000)
    try:
        deadline = time.time() + 240
        while not _steps(killed) and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        victim.kill()  # SIGKILL: no chance to save
        victim_out = victim.communicate(timeout=60)[0]
    killed_at = _steps(killed)
    assert killed_at and killed_at[-1] < STEPS, victim_out
    resumed = _crn_train(own_data, killed, STEPS)
    reference_out = reference.communicate(timeout=240)[0]
    assert reference.returncode == 0, reference_out
    yield {"whole": whole, "killed": killed, "reference_out": reference_out, "resumed": resumed, "last": killed_at[-1]}
    resumed.kill()


@pytest.mark.slow
def test_own_label_space_trains_exports_and_serves_colour_layouts(own_data, runs, tmp_path):
    whole = runs["whole"]
    assert '"num_classes": 7' in runs["reference_out"]  # from the data: crn-train had no class flag
    model = load_model(str(whole))
    assert model.crn_config.name == "tiny" and model.crn_config.get_label_space() == BEACH
    assert model.crn_config.input_channels == 8
    assert Synthesizer.from_model_dir(str(whole)).label_space == BEACH  # crn-synthesize --model_dir
    evaluation = data.make_dataset(
        str(own_data / "tfr"), "train", batch_size=4, config=model.crn_config, training=False
    )
    assert next(iter(evaluation))["layout"].shape[-1] == 8  # crn-eval's input for this model and data

    result = export_saved_model(model, str(tmp_path / "exports" / "beach"))
    synthesizer = Synthesizer.from_saved_model(str(tmp_path / "exports" / "beach"))
    assert synthesizer.label_space == BEACH  # the export carries the palette; no file beside it

    ids = _layout(np.random.default_rng(7))
    png = io.BytesIO()
    Image.fromarray(labels.ids_to_colors(ids, BEACH)).save(png, format="PNG")
    np.testing.assert_array_equal(labels.decode_label_image(png.getvalue(), synthesizer.label_space), ids)
    loaded = tf.saved_model.load(result.export_dir)
    out = loaded.signatures["synthesize_png"](label_png_bytes=tf.constant([png.getvalue()]))
    photo = tf.io.decode_png(out["image_png_bytes"][0]).numpy()
    expected = np.clip(np.round(model(labels.one_hot(ids[None], BEACH.num_classes)).numpy()[0]), 0, 255)
    # The export decodes the colours to this palette's ids in its graph. Same ops as Keras, but
    # multi-threaded kernels may differ in the last bit: one grey level (the export check's tolerance).
    assert np.abs(photo.astype(np.int16) - expected.astype(np.int16)).max() <= 1


@pytest.mark.slow
def test_sigkilled_deterministic_run_resumes_to_bit_identical_weights(runs):
    resumed_out = runs["resumed"].communicate(timeout=240)[0]
    assert runs["resumed"].returncode == 0, resumed_out
    last, killed = runs["last"], runs["killed"]
    assert f"resumed from {killed}/ckpt-{last} at step {last}" in resumed_out
    a, b = load_model(str(runs["whole"])), load_model(str(killed))
    assert _steps(runs["whole"])[-1] == _steps(killed)[-1] == STEPS
    for va, vb in zip(a.weights, b.weights, strict=True):
        # Bit-identical on purpose: --deterministic enables op determinism, and the input stream is
        # a function of the seed and the checkpointed position.
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)


def test_init_from_across_label_spaces_copies_what_matches_and_says_what_stays_fresh(tmp_path):
    from crn_tf.config import get_preset
    from crn_tf.model import build_model
    from crn_tf.model_dir import save_model_dir
    from crn_tf.train import init_from

    source = build_model(get_preset("tiny"))  # 19 classes + void
    save_model_dir(source, str(tmp_path / "cs"))
    target = build_model(get_preset("tiny").with_label_space(BEACH))  # 7 classes + void
    copied, skipped = init_from(target, str(tmp_path / "cs"))
    assert skipped == [] and copied[-1] == "head"
    assert copied[0].startswith("module_4x8 (kept fresh: conv1/kernel (3, 3, 8, 16) vs (3, 3, 20, 16))")
    for name in target.module_names:
        ours, theirs = getattr(target, name), getattr(source, name)
        np.testing.assert_array_equal(ours.conv2.kernel.numpy(), theirs.conv2.kernel.numpy())  # copied: exact
        assert ours.conv1.kernel.shape != theirs.conv1.kernel.shape


def test_a_training_size_the_preset_loss_cannot_use_is_refused():
    from crn_tf.config import get_preset
    from crn_tf.train import TrainConfig, check_loss_size

    tiny = get_preset("tiny").with_label_space(BEACH)
    check_loss_size(tiny, TrainConfig(), (16, 32))  # block5_conv2 after 4 poolings: 1x2
    with pytest.raises(ValueError, match=r"8x16 is too small .* 'tiny': it weights VGG-19 block5_conv2, .* 16x16"):
        check_loss_size(tiny, TrainConfig(), (8, 16))
    check_loss_size(tiny, TrainConfig(loss="image"), (8, 16))  # no VGG


def test_checkpoints_keep_the_input_position_and_old_ones_count_it_from_the_step(tmp_path):
    from crn_tf.config import get_preset
    from crn_tf.train import TrainConfig, Trainer

    config, quiet = get_preset("tiny"), lambda *a, **k: None
    train_config = TrainConfig(batch_size=2, steps=3, loss="image", vgg_weights="none", strategy="one_device")
    first = Trainer(config, train_config, str(tmp_path / "new"), log=quiet)
    first.initialize()
    first.step.assign(3)  # as after 3 steps of 2 examples (the step function itself is tested in test_train)
    first.save()
    assert first.input_position() == 6
    # Resumed with another batch size: the position goes on from 6 by 4 per step.
    bigger = Trainer(config, dataclasses.replace(train_config, batch_size=4, steps=5), str(tmp_path / "new"), log=quiet)
    assert "at step 3" in bigger.initialize() and bigger.input_position() == 6
    bigger.step.assign_add(2)
    assert bigger.input_position() == 14
    # A checkpoint written before the input position was saved (model, optimizer, step, loss state only).
    c = first.checkpoint
    old = tf.train.Checkpoint(model=c.model, optimizer=c.optimizer, step=c.step, loss_state=c.loss_state)
    old.save(str(tmp_path / "old" / "ckpt"))
    shutil.copy(tmp_path / "new" / "crn_config.json", tmp_path / "old" / "crn_config.json")
    resumed = Trainer(config, train_config, str(tmp_path / "old"), log=quiet)
    assert "resumed" in resumed.initialize() and int(resumed.step.numpy()) == 3 and resumed.input_position() == 6
