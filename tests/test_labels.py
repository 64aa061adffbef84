import io
import json

import numpy as np
import pytest
from conftest import EXAMPLE_LAYOUTS, GTA_PALETTE, TEST_DATA
from PIL import Image

from crn_tf import labels


def test_cityscapes_label_space():
    assert labels.CITYSCAPES.num_classes == 19
    assert labels.CITYSCAPES.palette[0] == (128, 64, 128)  # road
    assert labels.CITYSCAPES.palette[18] == (119, 11, 32)  # bicycle
    assert sorted(v for v in labels.CITYSCAPES_LABELID_TO_TRAINID.values() if v != 255) == list(range(19))
    ids = np.array([[7, 26, 18, 0]], np.uint8)  # road, car, polegroup (void), unlabeled
    np.testing.assert_array_equal(labels.remap_ids(ids, labels.CITYSCAPES_LABELID_TO_TRAINID), [[0, 13, 255, 255]])


def test_nyu40_label_space():
    assert labels.NYU40.num_classes == 40
    assert len(set(labels.NYU40.palette)) == 40 and labels.VOID_COLOR not in labels.NYU40.palette


@pytest.mark.parametrize(
    "path", [EXAMPLE_LAYOUTS / "cityscapes_256p_00100027.png", TEST_DATA / "cityscapes_layouts/512p_00100338.png"]
)
def test_colour_ids_colour_is_lossless_on_real_layouts(path):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    ids = labels.colors_to_ids(rgb, labels.CITYSCAPES)
    assert set(np.unique(ids)) - {255} <= set(range(19))
    assert len(set(np.unique(ids)) - {255}) >= 5  # a real street scene
    # These layouts also hold non-train Cityscapes colours (ground, dynamic) besides black: void to
    # the network, exactly the pixels whose colour is in no train class.
    in_palette = np.isin(rgb.astype(np.uint32) @ [65536, 256, 1], np.array(labels.CITYSCAPES.palette) @ [65536, 256, 1])
    np.testing.assert_array_equal(ids == 255, ~in_palette)
    back = labels.ids_to_colors(ids, labels.CITYSCAPES)
    np.testing.assert_array_equal(back[in_palette], rgb[in_palette])  # colour -> ids -> colour
    np.testing.assert_array_equal(labels.colors_to_ids(back, labels.CITYSCAPES), ids)  # ids -> colour -> ids


def test_palette_mode_gta_layout_counts_void_right():
    path = GTA_PALETTE
    image = Image.open(path)
    assert image.mode == "P"
    # Independently: colour of every pixel through the PNG's own palette.
    palette = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    colours = palette[np.asarray(image)]
    known = {tuple(c) for c in labels.GTA5.palette}
    expected_void = sum(tuple(c) not in known for c in colours.reshape(-1, 3))
    ids = labels.read_label_image(str(path), labels.GTA5)
    assert ids.shape == (256, 512)
    assert int((ids == 255).sum()) == expected_void
    np.testing.assert_array_equal(labels.ids_to_colors(ids, labels.GTA5)[ids != 255], colours[ids != 255])


def test_unknown_colours_are_void_and_decoding_modes():
    rgb = np.array([[[128, 64, 128], [1, 2, 3], [0, 0, 0], [0, 0, 142]]], np.uint8)
    np.testing.assert_array_equal(labels.colors_to_ids(rgb, labels.CITYSCAPES), [[0, 255, 255, 13]])

    def png(array, mode):
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="PNG")
        return buf.getvalue()

    ids = np.array([[0, 5, 255]], np.uint8)
    np.testing.assert_array_equal(labels.decode_label_image(png(ids, "L"), labels.CITYSCAPES), ids)
    rgba = np.concatenate([labels.ids_to_colors(ids, labels.CITYSCAPES), np.full((1, 3, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(labels.decode_label_image(png(rgba, "RGBA"), labels.CITYSCAPES), ids)
    with pytest.raises(ValueError, match="layout.png: not a readable image"):
        labels.decode_label_image(b"\x89PNG broken", labels.CITYSCAPES, source="layout.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="16.png: I;16"):
        labels.decode_label_image(buf.getvalue(), labels.CITYSCAPES, source="16.png")


def test_one_hot_has_void_last_and_sums_to_one():
    ids = np.array([[0, 18, 19, 255]], np.uint8)
    oh = labels.one_hot(ids, 19).numpy()
    assert oh.shape == (1, 4, 20)
    np.testing.assert_array_equal(oh.sum(-1), 1)
    np.testing.assert_array_equal(oh.argmax(-1), [[0, 18, 19, 19]])


def test_palette_json_round_trip(tmp_path):
    path = tmp_path / "palette.json"
    path.write_text(labels.CITYSCAPES.to_json())
    space = labels.get_label_space(str(path))
    assert space.palette == labels.CITYSCAPES.palette and space.class_names == labels.CITYSCAPES.class_names
    (tmp_path / "bad.json").write_text('{"classes": 3}')
    with pytest.raises(ValueError, match="bad.json: not a palette JSON"):
        labels.get_label_space(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="two classes share a colour"):
        labels.LabelSpace("x", ["a", "b"], [(1, 2, 3), (1, 2, 3)])


def test_ade20k_and_cocostuff_label_spaces():
    from crn_tf import config

    assert labels.ADE20K.num_classes == 150 and labels.COCOSTUFF.num_classes == 182
    assert labels.ADE20K.class_names[0] == "wall" and labels.ADE20K.palette[0] == (120, 120, 120)  # color150.mat
    assert labels.ADE20K.class_names[149] == "flag" and labels.ADE20K.palette[149] == (92, 0, 255)
    assert labels.COCOSTUFF.class_names[0] == "person" and labels.COCOSTUFF.class_names[181] == "wood"  # labels.txt
    assert labels.COCOSTUFF.class_names[11] == "street sign"  # un-annotated COCO ids keep their place
    # The label space travels in the model config: a preset's architecture, the data's classes.
    tiny = config.get_preset("tiny").with_label_space(labels.ADE20K)
    assert tiny.input_channels == 151 and tiny.widths == config.get_preset("tiny").widths
    assert config.CRNConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))).get_label_space() == labels.ADE20K
    with pytest.raises(ValueError, match="num_classes=5 disagrees with its classes"):
        config.CRNConfig(label_space="x", num_classes=5, classes=[("a", (1, 2, 3))])
