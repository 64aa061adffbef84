"""crn_tf.data: the TFRecord schema round trip, each transform eagerly and in Dataset.map, make_dataset."""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import random_ids
from PIL import Image

from crn_tf import config, data, labels
from crn_tf.fileio import write_json


def _photo_for(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A photo whose red channel encodes the label (ids * 10 % 256), so joint transforms can be checked."""
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (*ids.shape, 3), dtype=np.uint8)
    photo[..., 0] = (ids.astype(np.int32) * 10 % 256).astype(np.uint8)
    return photo


def _write_split(folder, split, pairs, num_shards=2, space=labels.CITYSCAPES, manifest=True):
    """Writes (photo, ids, name) triples as shards (+ a manifest like crn-convert's)."""
    names = [data.shard_name(split, i, num_shards) for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(str(folder / n)) for n in names]
    for i, (photo, ids, name) in enumerate(pairs):
        writers[i % num_shards].write(data.encode_pair(photo, ids, name).SerializeToString())
    for w in writers:
        w.close()
    if manifest:
        h, w = pairs[0][1].shape
        write_json(
            str(folder / f"{split}.json"),
            {
                "label_space": json.loads(space.to_json()),
                "count": len(pairs),
                "shards": names,
                "sizes": {f"{h}x{w}": 6},
            },
        )
    return names


@pytest.fixture
def pairs():
    out = []
    for i in range(6):
        ids = random_ids((16, 32), seed=i)
        out.append((_photo_for(ids, i), ids, f"pair_{i}"))
    return out


def test_encode_parse_round_trip_is_exact(pairs):
    photo, ids, name = pairs[0]
    serialized = data.encode_pair(photo, ids, name).SerializeToString()
    parsed = data.parse_example(tf.constant(serialized))
    np.testing.assert_array_equal(parsed["image"].numpy(), photo)
    np.testing.assert_array_equal(parsed["label_ids"].numpy(), ids)
    assert parsed["label_ids"].dtype == tf.uint8 and parsed["filename"].numpy() == b"pair_0"
    features = tf.train.Example.FromString(serialized).features.feature
    assert features[data.IMAGE_FORMAT].bytes_list.value == [b"png"]
    assert features[data.LABEL_FORMAT].bytes_list.value == [b"png"]
    assert features[data.IMAGE_HEIGHT].int64_list.value == [16]
    assert features[data.IMAGE_WIDTH].int64_list.value == [32]


def test_parse_in_dataset_map_matches_eager_and_reads_jpeg(pairs):
    photo, ids, name = pairs[1]
    jpeg = tf.io.encode_jpeg(photo).numpy()
    serialized = data.encode_example(jpeg, "jpeg", data.encode_png(ids), 16, 32, name).SerializeToString()
    eager = data.parse_example(tf.constant(serialized))
    mapped = next(iter(tf.data.Dataset.from_tensors(serialized).map(data.parse_example)))
    np.testing.assert_array_equal(eager["image"].numpy(), tf.io.decode_jpeg(jpeg).numpy())
    np.testing.assert_array_equal(mapped["image"].numpy(), eager["image"].numpy())
    np.testing.assert_array_equal(mapped["label_ids"].numpy(), ids)


def test_parse_refuses_size_mismatch_naming_the_file(pairs):
    photo, ids, _ = pairs[0]
    bad = data.encode_example(data.encode_png(photo), "png", data.encode_png(ids[:8]), 16, 32, "broken_frame")
    with pytest.raises(tf.errors.InvalidArgumentError, match="broken_frame"):
        data.parse_example(tf.constant(bad.SerializeToString()))


def test_encode_pair_refuses_bad_shapes(pairs):
    photo, ids, _ = pairs[0]
    with pytest.raises(ValueError, match="label ids must be uint8"):
        data.encode_pair(photo, ids[:, :8], "x")
    with pytest.raises(ValueError, match="photo must be uint8"):
        data.encode_pair(photo[..., 0], ids, "x")


def _both_ways(fn, example):
    """fn applied eagerly and inside Dataset.map: the two results, as numpy dicts."""
    eager = {k: v.numpy() for k, v in fn(example).items()}
    mapped = next(iter(tf.data.Dataset.from_tensors(example).map(fn)))
    return eager, {k: v.numpy() for k, v in mapped.items()}


def test_resize_pair_area_for_photo_nearest_for_labels(pairs):
    photo, ids, name = pairs[2]
    example = {"image": tf.constant(photo), "label_ids": tf.constant(ids), "filename": tf.constant(name)}
    for out in _both_ways(lambda e: data.resize_pair(e, (8, 16)), example):
        assert out["image"].shape == (8, 16, 3) and out["image"].dtype == np.float32
        # Area resampling by 2: each output pixel is the mean of a 2x2 block.
        blocks = photo.astype(np.float32).reshape(8, 2, 16, 2, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(out["image"], blocks, atol=1e-3)
        assert out["label_ids"].shape == (8, 16) and out["label_ids"].dtype == np.uint8
        # Nearest: every output id is one of the ids of its 2x2 block (never an interpolated value).
        block_ids = ids.reshape(8, 2, 16, 2).transpose(0, 2, 1, 3).reshape(8, 16, 4)
        assert np.all((block_ids == out["label_ids"][..., None]).any(-1))


def test_flip_pair_flips_photo_and_label_together(pairs):
    photo, ids, name = pairs[3]
    example = {"image": tf.constant(photo), "label_ids": tf.constant(ids), "filename": tf.constant(name)}
    for out in _both_ways(lambda e: data.flip_pair(e, True), example):
        np.testing.assert_array_equal(out["image"], photo[:, ::-1])
        np.testing.assert_array_equal(out["label_ids"], ids[:, ::-1])
    for out in _both_ways(lambda e: data.flip_pair(e, False), example):
        np.testing.assert_array_equal(out["image"], photo)
        np.testing.assert_array_equal(out["label_ids"], ids)


def test_random_flip_takes_both_outcomes_with_seeds(pairs):
    photo, ids, name = pairs[3]
    example = {"image": tf.constant(photo), "label_ids": tf.constant(ids), "filename": tf.constant(name)}
    outcomes = set()
    for s in range(12):
        out = data.random_flip(example, seed=tf.constant([s, 0]))
        flipped = np.array_equal(out["label_ids"].numpy(), ids[:, ::-1])
        assert flipped or np.array_equal(out["label_ids"].numpy(), ids)
        np.testing.assert_array_equal(out["image"].numpy(), photo[:, ::-1] if flipped else photo)
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_add_layout_one_hot_with_void_channel():
    ids = random_ids((16, 32), num_classes=19, seed=4)
    ids[0, :4] = [19, 200, 254, 255]  # outside the space -> void
    example = {"label_ids": tf.constant(ids)}
    for out in _both_ways(lambda e: data.add_layout(e, 19), example):
        layout = out["layout"]
        assert layout.shape == (16, 32, 20) and layout.dtype == np.float32
        np.testing.assert_array_equal(layout.sum(-1), 1.0)
        void = ids >= 19
        np.testing.assert_array_equal(layout[..., 19], void.astype(np.float32))
        np.testing.assert_array_equal(layout[~void].argmax(-1), ids[~void])


def test_make_dataset_training_shapes_flip_and_repeat(tmp_path, pairs):
    _write_split(tmp_path, "train", pairs)
    tiny = config.get_preset("tiny")  # 16x32 native, 19 classes
    ds = data.make_dataset(str(tmp_path), "train", batch_size=4, config=tiny, seed=3)
    spec = ds.element_spec
    assert spec["layout"].shape.as_list() == [4, 16, 32, 20] and spec["layout"].dtype == tf.float32
    assert spec["image"].shape.as_list() == [4, 16, 32, 3] and spec["image"].dtype == tf.float32
    assert spec["label_ids"].shape.as_list() == [4, 16, 32] and spec["label_ids"].dtype == tf.uint8
    assert spec["filename"].shape.as_list() == [4] and spec["filename"].dtype == tf.string
    originals = {name: ids for _, ids, name in pairs}
    flips = set()
    for batch in ds.take(6):  # 24 examples from 6: repeat() works
        for i in range(4):
            ids = batch["label_ids"][i].numpy()
            # Photo and label went through the same flip: the red channel still encodes the label.
            np.testing.assert_array_equal(batch["image"][i, ..., 0].numpy(), (ids.astype(np.int32) * 10 % 256))
            np.testing.assert_array_equal(batch["layout"][i].numpy().argmax(-1), np.minimum(ids, 19))
            original = originals[batch["filename"][i].numpy().decode()]
            flipped = np.array_equal(ids, original[:, ::-1])
            assert flipped or np.array_equal(ids, original)
            flips.add(flipped)
    assert flips == {True, False}


def test_make_dataset_eval_is_finite_unflipped_and_resizes(tmp_path, pairs):
    _write_split(tmp_path, "val", pairs)
    ds = data.make_dataset(str(tmp_path), "val", batch_size=4, image_size=(8, 16), training=False)
    batches = list(ds)
    assert [b["image"].shape[0] for b in batches] == [4, 2]  # the last partial batch is kept
    assert batches[0]["image"].shape == (4, 8, 16, 3)
    names = sorted(n.decode() for b in batches for n in b["filename"].numpy())
    assert names == sorted(name for _, _, name in pairs)
    by_name = {name: ids for _, ids, name in pairs}
    for b in batches:
        for name, ids in zip(b["filename"].numpy(), b["label_ids"].numpy()):
            # Nearest with half-pixel centres picks the odd rows/columns; no flip outside training.
            np.testing.assert_array_equal(ids, by_name[name.decode()][1::2, 1::2])


def test_make_dataset_refuses_class_count_mismatch(tmp_path, pairs):
    _write_split(tmp_path, "train", pairs)
    with pytest.raises(ValueError, match=r"40 classes.*cityscapes.*19 classes"):
        data.make_dataset(str(tmp_path), "train", batch_size=2, config=config.get_preset("nyu_256p"))


def test_make_dataset_needs_manifest_or_label_space(tmp_path, pairs):
    _write_split(tmp_path, "train", pairs, manifest=False)
    with pytest.raises(ValueError, match=r"train\.json: no manifest"):
        data.make_dataset(str(tmp_path), "train", batch_size=2)
    with pytest.raises(ValueError, match="pass label_space"):
        data.make_dataset(file_pattern=str(tmp_path / "train-*"), batch_size=2)


def test_make_dataset_reads_deeplab_style_records_with_explicit_label_space(tmp_path, pairs):
    # DeepLab's converters write the same keys, no manifest, and JPEG photos.
    with tf.io.TFRecordWriter(str(tmp_path / "deeplab-train-00000-of-00001.tfrecord")) as w:
        for photo, ids, name in pairs:
            jpeg = tf.io.encode_jpeg(photo).numpy()
            w.write(data.encode_example(jpeg, "jpeg", data.encode_png(ids), 16, 32, name).SerializeToString())
    ds = data.make_dataset(
        file_pattern=str(tmp_path / "deeplab-train-*"),
        label_space="cityscapes",
        batch_size=3,
        image_size=(16, 32),
        training=False,
    )
    batches = list(ds)
    assert len(batches) == 2 and batches[0]["layout"].shape == (3, 16, 32, 20)
    np.testing.assert_array_equal(batches[0]["label_ids"][0].numpy(), pairs[0][1])


def _batches(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def test_seeded_stream_is_exact_and_resumes_at_a_position(tmp_path, pairs):
    _write_split(tmp_path, "train", pairs)
    tiny = config.get_preset("tiny")

    def make(**kw):
        return data.make_dataset(str(tmp_path), "train", batch_size=2, config=tiny, shuffle_buffer=3, **kw)

    first = _batches(make(seed=5), 8)  # 16 examples: almost three epochs of 6
    tf.random.set_seed(123)  # a global seed (a Trainer sets one) must not change the stream
    again = _batches(make(seed=5), 8)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    epochs = [sorted(n.decode() for b in first[i : i + 3] for n in b["filename"]) for i in (0, 3)]
    assert epochs[0] == epochs[1] == sorted(n for *_, n in pairs)  # every epoch is a permutation
    assert [n for b in first[:3] for n in b["filename"]] != [n for b in first[3:6] for n in b["filename"]]
    resumed = _batches(make(seed=5, position=8), 4)  # 4 batches of 2 consumed: epoch 1, offset 2
    for a, b in zip(first[4:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_from_a_city_sorted_source_mix_cities(tmp_path):
    from data_tools import common, folder

    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for city in range(8):  # listed city by city, as Cityscapes is
        for k in range(8):
            Image.fromarray(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)).save(root / f"images/c{city}_{k}.png")
            Image.fromarray(random_ids((4, 8), seed=k)).save(root / f"labels/c{city}_{k}.png")
    common.convert(folder.make_source(str(root)), str(tmp_path / "tfr"), "train", num_shards=2)
    ds = data.make_dataset(str(tmp_path / "tfr"), "train", batch_size=8, image_size=(4, 8), shuffle_buffer=8, seed=0)
    cities = [len({n.decode().split("_")[0] for n in b["filename"]}) for b in _batches(ds, 8)]
    # Contiguous shards of sorted items through an 8-example buffer gave ~2 cities per batch; a random
    # order across shards gives what random draws give (8 draws of 8 cities: ~5.3 on average).
    assert np.mean(cities) >= 4, cities


def test_bad_manifests_and_out_of_space_ids_fail_naming_the_file(tmp_path, pairs):
    _write_split(tmp_path, "train", pairs)
    path = tmp_path / "train.json"
    manifest = json.loads(path.read_text())
    for broken, message in (
        ({k: v for k, v in manifest.items() if k != "label_space"}, "manifest lacks 'label_space'"),
        ({**manifest, "label_space": "cityscapes"}, r"its 'label_space'\): not a palette JSON"),
        ({**manifest, "label_space": {"classes": [{"name": "a"}]}}, r"its 'label_space'\): not a palette JSON"),
        ({**manifest, "num_classes": 7}, "'num_classes' is 7 but its 'label_space' lists 19"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=rf"train\.json.*{message}"):
            data.make_dataset(str(tmp_path), "train", batch_size=2, image_size=(16, 32))
    small = labels.LabelSpace("three", ["a", "b", "c"], [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    _write_split(tmp_path, "train", pairs, space=small)  # ids up to 18 in a 3-class space
    ds = data.make_dataset(str(tmp_path), "train", batch_size=2, image_size=(16, 32), training=False)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"train\.json: example\] \[pair_\d\] \[has class ids beyond label space"
    ):
        next(iter(ds))
