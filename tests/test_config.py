import dataclasses
import subprocess
import sys

import pytest

from crn_tf import config as cfg


def test_paper_widths_match_the_paper():
    # Sec. 3.2: 1024 for i = 0..4, 512 for i = 5, 6, 128 for i = 7, 32 for i = 8.
    assert cfg.paper_widths(9) == (1024,) * 5 + (512, 512, 128, 32)


@pytest.mark.parametrize(
    "preset, modules, native, params",
    [
        # Counts read from the released checkpoints (original_crn.md): 97.9M, 98.6M, 98.7M.
        ("cityscapes_256p", 7, (256, 512), 97.9e6),
        ("cityscapes_512p", 8, (512, 1024), 98.6e6),
        ("cityscapes_1024p", 9, (1024, 2048), 98.7e6),
    ],
)
def test_presets_match_the_released_models(preset, modules, native, params):
    c = cfg.get_preset(preset)
    assert c.num_modules == modules
    assert c.native_size == native
    assert c.input_channels == 20
    assert c.num_parameters() == pytest.approx(params, rel=5e-4)


def test_nyu_preset_keeps_the_4_to_3_aspect():
    c = cfg.get_preset("nyu_256p")
    h, w = c.native_size
    assert (h, w) == (192, 256) and w * 3 == h * 4
    assert c.input_channels == 41


def test_overrides_and_validation():
    c = cfg.get_preset("tiny", num_outputs=3, upsampling="half_pixel")
    assert c.num_outputs == 3 and c.upsampling == "half_pixel"
    assert dataclasses.replace(c, widths=[8, 8]).widths == (8, 8)
    with pytest.raises(ValueError, match="upsampling"):
        cfg.get_preset("tiny", upsampling="nearest")
    with pytest.raises(ValueError, match="num_classes=5 disagrees with label space 'cityscapes'"):
        cfg.get_preset("tiny", num_classes=5)
    with pytest.raises(ValueError, match="layer_weights needs 6"):
        cfg.get_preset("tiny", layer_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown preset"):
        cfg.get_preset("cityscapes_2048p")
    with pytest.raises(ValueError, match="unknown CRNConfig fields"):
        cfg.CRNConfig.from_dict({"widths": [8], "depth": 3})


def test_dict_round_trip():
    c = cfg.get_preset("cityscapes_256p")
    assert cfg.CRNConfig.from_dict(c.to_dict()) == c


def test_summary_command_prints_the_parameter_count():
    out = subprocess.run(
        [sys.executable, "-m", "crn_tf.config", "--preset", "cityscapes_1024p", "--summary"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "module_1024x2048" in out and "98,674,531" in out
