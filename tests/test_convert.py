"""data_tools: every converter on small inputs in the real layouts, read back with the training parser;
bad inputs and faults (each with a clear error, or listed with skip_bad); the crn-convert CLI."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import CITYSCAPES_PAIRS
from PIL import Image

from crn_tf import config, data, labels
from crn_tf.config import parse_size
from data_tools import ade20k, cityscapes, cocostuff, common, folder, gta, nyu, synthetic
from data_tools import convert as convert_cli


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _read_back(out_dir, split="train"):
    """Every example of a converted split, parsed with the training parser, by filename."""
    manifest = data.load_manifest(str(out_dir), split)
    files = [str(out_dir / s) for s in manifest["shards"]]
    parsed = [data.parse_example(r) for r in tf.data.TFRecordDataset(files)]
    return manifest, {p["filename"].numpy().decode(): (p["image"].numpy(), p["label_ids"].numpy()) for p in parsed}


def _tfrecords(folder_path):
    return sorted(p.name for p in folder_path.glob("*") if ".tfrecord" in p.name)


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_in_cityscapes_layout(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), "train", 2, 32, 64, seed=5)
    synthetic.generate(str(tmp_path / "b"), "train", 2, 32, 64, seed=5)
    synthetic.generate(str(tmp_path / "c"), "train", 2, 32, 64, seed=6)
    assert a[0].endswith("a/leftImg8bit/train/synth/synth_000000_000019_leftImg8bit.png")
    rel = "leftImg8bit/train/synth/synth_000001_000019_leftImg8bit.png"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    label_ids = np.asarray(Image.open(tmp_path / "a/gtFine/train/synth/synth_000001_000019_gtFine_labelIds.png"))
    colors = np.asarray(Image.open(tmp_path / "a/gtFine/train/synth/synth_000001_000019_gtFine_color.png"))
    assert label_ids.shape == (32, 64) and colors.shape == (32, 64, 3)
    assert {synthetic.SKY, synthetic.ROAD, synthetic.BUILDING} <= set(np.unique(label_ids))
    # The two label files agree.
    train_ids = labels.remap_ids(label_ids, labels.CITYSCAPES_LABELID_TO_TRAINID)
    np.testing.assert_array_equal(labels.colors_to_ids(colors, labels.CITYSCAPES), train_ids)


# -------------------------------------------------------------------------------------- cityscapes


@pytest.mark.parametrize("route", ["labelIds", "color"])
def test_cityscapes_routes_round_trip(tmp_path, route):
    synthetic.generate(str(tmp_path / "cs"), "val", 3, 32, 64, seed=1)
    out = tmp_path / "tfr"
    common.convert(cityscapes.make_source(str(tmp_path / "cs"), "val", route), str(out), "val", num_shards=2)
    manifest, examples = _read_back(out, "val")
    assert manifest["count"] == 3 and manifest["source"]["label_route"] == route
    assert manifest["label_space"]["name"] == "cityscapes" and manifest["num_classes"] == 19
    assert manifest["sizes"] == {"32x64": 3} and manifest["converter_version"] == common.CONVERTER_VERSION
    assert _tfrecords(out) == ["val-00000-of-00002.tfrecord", "val-00001-of-00002.tfrecord"]
    for name, (image, ids) in examples.items():
        base = tmp_path / "cs"
        photo = np.asarray(Image.open(base / f"leftImg8bit/val/synth/{name}_leftImg8bit.png"))
        label_ids = np.asarray(Image.open(base / f"gtFine/val/synth/{name}_gtFine_labelIds.png"))
        np.testing.assert_array_equal(image, photo)
        np.testing.assert_array_equal(ids, labels.remap_ids(label_ids, labels.CITYSCAPES_LABELID_TO_TRAINID))


def test_cityscapes_real_pairs_colour_route_resized_into_the_pipeline(tmp_path):
    root = tmp_path / "cityscapes"
    # As in the official release: aachen is a train city, frankfurt a val city.
    for stem, split in (("aachen_000000_000019", "train"), ("frankfurt_000000_000294", "val")):
        city = stem.split("_")[0]
        for kind, sub in (("leftImg8bit", "leftImg8bit"), ("gtFine_color", "gtFine")):
            dest = root / sub / split / city / f"{stem}_{kind}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CITYSCAPES_PAIRS / f"{stem}_{kind}.png", dest)
    out = tmp_path / "tfr"
    for split in ("train", "val"):
        source = cityscapes.make_source(str(root), split, "color")
        manifest = common.convert(source, str(out), split, num_shards=1, resize=(32, 64), workers=2)
        assert manifest["count"] == 1 and manifest["resize"] == "32x64" and "licence plate -> car" in str(manifest)
    assert sorted(_read_back(out, "val")[1]) == ["frankfurt_000000_000294"]
    _, examples = _read_back(out)
    rgba = np.asarray(Image.open(CITYSCAPES_PAIRS / "aachen_000000_000019_gtFine_color.png"))
    assert rgba.shape[-1] == 4  # the official _color.png files are RGBA
    full = labels.colors_to_ids(rgba[..., :3], labels.CITYSCAPES)
    image, ids = examples["aachen_000000_000019"]
    assert image.shape == (32, 64, 3) and ids.shape == (32, 64)
    np.testing.assert_array_equal(ids, full[4::8, 4::8])  # nearest by 8 (pixel centres)
    assert {0, 2, 10, 13} <= set(np.unique(ids))  # road, building, sky, car in a real street scene
    batch = next(iter(data.make_dataset(str(out), "train", batch_size=2, config=config.get_preset("tiny"))))
    assert batch["layout"].shape == (2, 16, 32, 20) and float(batch["image"].numpy().max()) <= 255.0


# ------------------------------------------------------------------------------------- gta, folder


def _palette_png(ids_rgb_space, train_ids):
    """A palette-mode image whose colours are the label space's, like GTA5's labels."""
    image = Image.fromarray(train_ids, "P")
    pal = np.zeros((256, 3), np.uint8)
    pal[: ids_rgb_space.num_classes] = ids_rgb_space.palette
    image.putpalette(pal.ravel().tolist())
    return image


def test_gta_palette_labels(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(3):
        ids = rng.integers(0, 19, (16, 32)).astype(np.uint8)
        ids[0, 0] = 200  # a palette index with a colour outside the space (black) -> void
        _save(tmp_path / "gta/images" / f"{i:05d}.png", rng.integers(0, 256, (16, 32, 3), dtype=np.uint8))
        path = tmp_path / "gta/labels" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _palette_png(labels.GTA5, ids).save(path)
        truth[f"{i:05d}"] = np.where(ids < 19, ids, 255)
    manifest = common.convert(gta.make_source(str(tmp_path / "gta")), str(tmp_path / "out"), "train")
    assert manifest["source"]["dataset"] == "gta" and manifest["label_space"]["name"] == "gta5"
    _, examples = _read_back(tmp_path / "out")
    for name, ids in truth.items():
        np.testing.assert_array_equal(examples[name][1], ids)


def test_folder_ids_and_colours_with_palette_json(tmp_path):
    space = labels.LabelSpace("toy", ["a", "b", "c"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    palette = tmp_path / "palette.json"
    palette.write_text(space.to_json())
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 3, (16, 32)).astype(np.uint8)
    ids[:2] = 255  # void
    photo = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    jpeg = tmp_path / "ids/images/frame.jpg"
    jpeg.parent.mkdir(parents=True)
    Image.fromarray(photo).save(jpeg, quality=95)
    _save(tmp_path / "ids/labels/frame.png", ids)
    _save(tmp_path / "col/images/frame.png", photo)
    _save(tmp_path / "col/labels/frame.png", labels.ids_to_colors(ids, space))
    expected = np.where(ids < 3, ids, 255)

    common.convert(folder.make_source(str(tmp_path / "ids"), "ids", str(palette)), str(tmp_path / "o1"), "train")
    manifest, examples = _read_back(tmp_path / "o1")
    np.testing.assert_array_equal(examples["frame"][1], expected)
    # The JPEG photo is stored as is (no re-encoding loss): it decodes like the source file.
    np.testing.assert_array_equal(examples["frame"][0], tf.io.decode_jpeg(jpeg.read_bytes()).numpy())
    assert manifest["label_space"]["name"] == "toy" and manifest["num_classes"] == 3

    common.convert(folder.make_source(str(tmp_path / "col"), "colors", str(palette)), str(tmp_path / "o2"), "train")
    _, examples = _read_back(tmp_path / "o2")
    np.testing.assert_array_equal(examples["frame"][1], expected)
    np.testing.assert_array_equal(examples["frame"][0], photo)

    # An id beyond the label space (not 255) is an error naming the file, not silently void.
    ids[3, 3] = 7
    _save(tmp_path / "ids/labels/frame.png", ids)
    with pytest.raises(
        common.ConversionError, match=r"ids/labels/frame.png: class ids \[7\] are beyond label space 'toy'"
    ):
        common.convert(folder.make_source(str(tmp_path / "ids"), "ids", str(palette)), str(tmp_path / "o3"), "train")


# --------------------------------------------------------------------------------------------- nyu


def _fake_nyu(path, n=3, h=12, w=16, seed=0):
    """A small file in the layout of nyu_depth_v2_labeled.mat: MATLAB's [H, W, 3, N] seen transposed by HDF5."""
    h5py = pytest.importorskip("h5py")  # the nyu converter's optional dependency
    rng = np.random.default_rng(seed)
    photos = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # what the frames look like
    raw = rng.integers(0, 895, (n, h, w)).astype(np.uint16)  # raw classes, 0 = unlabeled
    with h5py.File(path, "w") as f:
        f["images"] = np.transpose(photos, (0, 3, 2, 1))  # [N, 3, W, H]
        f["labels"] = np.transpose(raw, (0, 2, 1))  # [N, W, H]
        f["depths"] = np.zeros((n, w, h), np.float32)
    return photos, raw


def test_nyu_transposed_hdf5_and_class_mapping(tmp_path):
    photos, raw = _fake_nyu(tmp_path / "nyu_depth_v2_labeled.mat")
    mapping = (np.arange(894) % 40 + 1).tolist()  # raw k -> 40-class ((k-1) % 40) + 1, like mapClass
    (tmp_path / "map40.json").write_text(json.dumps(mapping))
    source = nyu.make_source(str(tmp_path / "nyu_depth_v2_labeled.mat"), str(tmp_path / "map40.json"), [0, 2])
    manifest = common.convert(source, str(tmp_path / "out"), "train", num_shards=2, workers=2)
    assert manifest["count"] == 2 and manifest["label_space"]["name"] == "nyu40" and manifest["num_classes"] == 40
    _, examples = _read_back(tmp_path / "out")
    assert sorted(examples) == ["nyu_0001", "nyu_0003"]
    image, ids = examples["nyu_0003"]
    np.testing.assert_array_equal(image, photos[2])
    expected = np.where(raw[2] == 0, 255, (raw[2].astype(np.int64) - 1) % 40)
    np.testing.assert_array_equal(ids, expected)
    # The same mapping as a .npy of 895 entries (entry 0 = unlabeled) gives the same table.
    np.save(tmp_path / "map40.npy", np.array([0] + mapping))
    np.testing.assert_array_equal(
        nyu.load_mapping(str(tmp_path / "map40.npy")), nyu.load_mapping(str(tmp_path / "map40.json"))
    )


def test_nyu_mapping_file_problems(tmp_path):
    (tmp_path / "short.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(common.ConversionError, match=r"short\.json: mapping has 3 entries; expected 894"):
        nyu.load_mapping(str(tmp_path / "short.json"))
    (tmp_path / "big.json").write_text(json.dumps([41] * 894))
    with pytest.raises(common.ConversionError, match="expected 0..40"):
        nyu.load_mapping(str(tmp_path / "big.json"))
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "classMapping40.mat", "w") as f:  # a v7.3 (HDF5) .mat is read with h5py
        f["mapClass"] = np.full((894, 1), 3.0)
    assert nyu.load_mapping(str(tmp_path / "classMapping40.mat"))[5] == 2


# ------------------------------------------------------------------------------- bad input, faults


def _pairs_folder(root, n=4, h=16, w=32):
    rng = np.random.default_rng(2)
    for i in range(n):
        _save(root / "images" / f"f{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _save(root / "labels" / f"f{i}.png", rng.integers(0, 19, (h, w)).astype(np.uint8))
    return root


def _convert_folder(root, out, **kwargs):
    return common.convert(folder.make_source(str(root)), str(out), "train", num_shards=2, **kwargs)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "labels/f1.png").unlink(), r"f1\.png: photo without label"),
        (lambda r: (r / "images/f2.png").unlink(), r"f2\.png: label without photo"),
        (lambda r: (r / "images/f1.png").write_bytes((r / "images/f1.png").read_bytes()[:80]), "unreadable or trunc"),
        (lambda r: (r / "labels/f3.png").write_bytes(b"not a png"), r"labels/f3\.png: unreadable"),
        (lambda r: _save(r / "labels/f2.png", np.zeros((8, 32), np.uint8)), r"f2\.png: label is 8x32 but its photo"),
        (lambda r: Image.fromarray(np.zeros((16, 32), np.uint16)).save(r / "labels/f0.png"), "16-bit label PNG"),
        (lambda r: _save(r / "labels/f0.png", np.zeros((16, 32, 3), np.uint8)), "expected single-channel 8-bit ids"),
    ],
    ids=["no_label", "no_photo", "truncated_photo", "garbage_label", "size_mismatch", "16bit_label", "rgb_ids"],
)
def test_bad_inputs_fail_clearly_leave_nothing_and_skip_bad_lists_them(tmp_path, damage, message):
    root = _pairs_folder(tmp_path / "in")
    damage(root)
    out = tmp_path / "out"
    with pytest.raises(common.ConversionError, match=message):
        _convert_folder(root, out, workers=2)
    assert _tfrecords(out) == [] and not (out / "train.json").exists()
    manifest = _convert_folder(root, out, skip_bad=True)
    assert manifest["count"] == 3 and len(manifest["skipped"]) == 1
    assert "f" in manifest["skipped"][0]["file"] and manifest["skipped"][0]["error"]
    assert len(_read_back(out)[1]) == 3


def test_grayscale_and_rgba_photos_are_converted_with_a_note(tmp_path):
    root = _pairs_folder(tmp_path / "in", n=2)
    gray = np.arange(16 * 32, dtype=np.uint8).reshape(16, 32)
    _save(root / "images/f0.png", gray)
    rgba = np.dstack([np.full((16, 32, 3), 77, np.uint8), np.full((16, 32), 128, np.uint8)])
    _save(root / "images/f1.png", rgba)
    manifest = _convert_folder(root, tmp_path / "out")
    assert sorted(n["note"] for n in manifest["notes"]) == [
        "photo mode L converted to RGB",
        "photo mode RGBA converted to RGB (alpha dropped)",
    ]
    _, examples = _read_back(tmp_path / "out")
    np.testing.assert_array_equal(examples["f0"][0], np.dstack([gray] * 3))
    np.testing.assert_array_equal(examples["f1"][0], rgba[..., :3])


def test_sixteen_bit_photo_is_refused(tmp_path):
    root = _pairs_folder(tmp_path / "in", n=1)
    Image.fromarray(np.zeros((16, 32), np.uint16)).save(root / "images/f0.png")
    with pytest.raises(common.ConversionError, match=r"f0\.png: 16-bit or float photo"):
        _convert_folder(root, tmp_path / "out")


def test_empty_inputs(tmp_path):
    (tmp_path / "e/images").mkdir(parents=True)
    (tmp_path / "e/labels").mkdir()
    with pytest.raises(common.ConversionError, match="empty input"):
        folder.make_source(str(tmp_path / "e"))
    with pytest.raises(common.ConversionError, match=r"leftImg8bit/train: no photos"):
        cityscapes.make_source(str(tmp_path / "e"), "train")
    with pytest.raises(common.ConversionError, match=r"nothing/images: folder not found"):
        folder.make_source(str(tmp_path / "nothing"))


def test_ctrl_c_keeps_the_previous_dataset_whole_and_rerun_completes(tmp_path):
    root = _pairs_folder(tmp_path / "in", n=6)
    out = tmp_path / "out"
    _convert_folder(root, out)  # an earlier complete run: it must stay readable through a broken re-run
    before = _read_back(out)
    source = folder.make_source(str(root))
    load = source.load

    def interrupted(item):
        if item.name == "f4":
            raise KeyboardInterrupt
        return load(item)

    source.load = interrupted
    with pytest.raises(KeyboardInterrupt):
        common.convert(source, str(out), "train", num_shards=3, workers=2)
    # The old manifest and its 2 shards are untouched (the re-run wrote new names, then removed them).
    assert _tfrecords(out) == [data.shard_name("train", i, 2) for i in range(2)]
    after = _read_back(out)
    assert after[0] == before[0] and sorted(after[1]) == sorted(before[1])
    for name, (photo, ids) in before[1].items():
        np.testing.assert_array_equal(after[1][name][0], photo)
        np.testing.assert_array_equal(after[1][name][1], ids)
    assert not [p for p in out.glob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    # Re-running the command completes the job; the old 2-shard files are replaced by 3 shards.
    manifest = common.convert(folder.make_source(str(root)), str(out), "train", num_shards=3)
    assert manifest["count"] == 6 and _tfrecords(out) == [data.shard_name("train", i, 3) for i in range(3)]
    assert len(_read_back(out)[1]) == 6


def test_parallel_workers_write_the_same_records_as_one(tmp_path):
    root = _pairs_folder(tmp_path / "in", n=5)
    _convert_folder(root, tmp_path / "one", workers=1, resize=(8, 16))
    _convert_folder(root, tmp_path / "four", workers=4, resize=(8, 16))
    for name in _tfrecords(tmp_path / "one"):
        one = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "one" / name))]
        four = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "four" / name))]
        assert one == four and one


def test_parse_size():
    assert parse_size("256x512", "--resize") == (256, 512)
    assert parse_size("", "--resize") is None and parse_size("none", "--resize") is None
    with pytest.raises(ValueError, match=r"--resize='256': expected HxW"):
        parse_size("256", "--resize")


def test_progress_bar_reports_images_per_second():
    stream = io.StringIO()
    bar = common.Progress(2, stream=stream)
    bar.update(2)
    assert bar.close() > 0 and "2/2" in stream.getvalue() and "images/s" in stream.getvalue()


# --------------------------------------------------------------------------------------------- CLI


def test_cli_synthetic_end_to_end(tmp_path, capsys):
    argv = ["crn-convert", f"--input={tmp_path / 'raw'}", f"--output_dir={tmp_path / 'tfr'}", "--count=3"]
    argv += ["--size=32x64", "--num_shards=2", "--split=val", "--noprogress", "--workers=2"]
    convert_cli.define_flags()
    convert_cli.FLAGS(argv)
    try:
        convert_cli.main(["crn-convert", "synthetic"])
        summary = json.loads(capsys.readouterr().out)
        assert summary["count"] == 3 and summary["sizes"] == {"32x64": 3} and len(summary["shards"]) == 2
        convert_cli.FLAGS(["crn-convert", f"--input={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'x'}"])
        with pytest.raises(SystemExit, match=r"crn-convert: .*missing/images: folder not found"):
            convert_cli.main(["crn-convert", "folder"])
    finally:
        convert_cli.FLAGS.unparse_flags()
    assert data.load_manifest(str(tmp_path / "tfr"), "val")["count"] == 3


# ------------------------------------------------------------------------------- ADE20K, COCO-Stuff


def _official_tree(root, photo_dir, label_dir, stems, values, h=16, w=32, ext="jpg"):
    """Photos and 8-bit id PNGs under the given folders; label k holds `values[k]` in blocks."""
    rng = np.random.default_rng(3)
    for stem, vals in zip(stems, values):
        photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / photo_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(root / photo_dir / f"{stem}.{ext}", quality=95)
        ids = np.resize(np.repeat(np.asarray(vals, np.uint8), 4), (h, w))
        _save(root / label_dir / f"{stem}.png", ids)


def test_ade20k_official_layout_maps_other_to_void(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _official_tree(root, "images/training", "annotations/training", ["ADE_train_00000001", "ADE_train_00000002"],
                   [[0, 1, 150, 13], [2, 3, 0, 7]])  # fmt: skip
    _official_tree(root, "images/validation", "annotations/validation", ["ADE_val_00000001"], [[5, 0]])
    manifest = common.convert(ade20k.make_source(str(root), "train"), str(tmp_path / "out"), "train")
    _, examples = _read_back(tmp_path / "out")
    assert manifest["num_classes"] == 150 and manifest["label_space"]["name"] == "ade20k"
    assert manifest["label_space"]["classes"][0]["name"] == "wall"
    assert set(np.unique(examples["ADE_train_00000001"][1])) == {255, 0, 149, 12}
    assert sorted(examples) == ["ADE_train_00000001", "ADE_train_00000002"]
    val = ade20k.make_source(str(root), "val")
    assert [i.name for i in val.items] == ["ADE_val_00000001"]
    _official_tree(root, "images/training", "annotations/training", ["ADE_train_00000003"], [[151, 1]])
    with pytest.raises(common.ConversionError, match=r"ADE_train_00000003\.png: label values \[151\]"):
        common.convert(ade20k.make_source(str(root), "train"), str(tmp_path / "out2"), "train")


def test_cocostuff_official_layout_keeps_ids_and_voids_255(tmp_path):
    root = tmp_path / "cocostuff"
    maps = "stuffthingmaps_trainval2017"
    _official_tree(root, "train2017", f"{maps}/train2017", ["000000000009", "000000000025"],
                   [[0, 181, 255, 91], [11, 255]])  # fmt: skip
    manifest = common.convert(cocostuff.make_source(str(root), "train"), str(tmp_path / "out"), "train")
    _, examples = _read_back(tmp_path / "out")
    assert manifest["num_classes"] == 182 and manifest["label_space"]["name"] == "cocostuff"
    assert set(np.unique(examples["000000000009"][1])) == {0, 181, 255, 91}
    with pytest.raises(common.ConversionError, match="val2017: folder not found"):
        cocostuff.make_source(str(root), "val")
    _official_tree(root, "train2017", f"{maps}/train2017", ["000000000030"], [[182, 200]])
    with pytest.raises(common.ConversionError, match=r"000000000030\.png: label values \[182, 200\]"):
        common.convert(cocostuff.make_source(str(root), "train"), str(tmp_path / "out2"), "train")


# ------------------------------------------------------------- shard order, locking, literal paths


def test_default_shard_count_grows_with_the_dataset():
    assert common.default_num_shards(4, 1e5) == 1  # a handful of pairs: one file
    assert common.default_num_shards(64, 1e5) == 8  # one shard per 8 pairs up to MIN_SHARDS
    assert common.default_num_shards(2975, 2e5) == common.MIN_SHARDS  # Cityscapes at 256p: ~570 MB
    assert common.default_num_shards(118_000, 2.5e5) == 110  # COCO train: ~28 GB in ~256 MB shards


def test_pairs_are_written_in_a_seeded_random_order(tmp_path):
    root = _pairs_folder(tmp_path / "in", n=12, h=8, w=8)
    manifest = _convert_folder(root, tmp_path / "a", resize=None)
    stored = [r for s in manifest["shards"] for r in tf.data.TFRecordDataset(str(tmp_path / "a" / s))]
    names = [data.parse_example(r)["filename"].numpy().decode() for r in stored]
    assert sorted(names) == sorted(f"f{i}" for i in range(12)) and names != sorted(names, key=lambda n: int(n[1:]))
    assert manifest["order"] == {"shuffled": True, "seed": 0}
    again = _convert_folder(root, tmp_path / "b")
    assert [r.numpy() for r in tf.data.TFRecordDataset([str(tmp_path / "b" / s) for s in again["shards"]])] == [
        r.numpy() for r in stored
    ]


def test_a_second_convert_into_the_same_split_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import subprocess
    import sys

    root = _pairs_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".train.lock"
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 0}))  # alive
    with pytest.raises(common.ConversionError, match=rf"\.train\.lock: another crn-convert .*pid {os.getppid()}"):
        _convert_folder(root, out)
    assert lock.exists() and not (out / "train.json").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "started": 0}))  # dead
    assert _convert_folder(root, out)["count"] == 4 and not lock.exists()


def test_glob_characters_in_paths_are_taken_literally(tmp_path):
    root = _pairs_folder(tmp_path / "in[x]*", n=4)
    out = tmp_path / "run[1]?"
    _convert_folder(root, out)  # 2 shards
    manifest = common.convert(folder.make_source(str(root)), str(out), "train", num_shards=3)
    assert manifest["count"] == 4 and _tfrecords(out) == [data.shard_name("train", i, 3) for i in range(3)]
    synthetic.generate(str(tmp_path / "cs[a]"), "val", 2, 16, 32, 0)
    assert len(cityscapes.make_source(str(tmp_path / "cs[a]"), "val").items) == 2
