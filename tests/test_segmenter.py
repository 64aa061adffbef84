"""The small segmenter, loading segmentation SavedModels, label mappings, and crn-eval --segmenter.

One module fixture generates synthetic street scenes (32x64), trains the small segmenter and a tiny
CRN on them once; the tests reuse both.
"""

import json
import types

import numpy as np
import pytest
import tensorflow as tf

from crn_tf import data, labels, segmenter
from crn_tf import evaluate as ev
from crn_tf.config import get_preset
from crn_tf.model import CascadedRefinementNetwork
from crn_tf.model_dir import save_model_dir
from crn_tf.train import TrainConfig, Trainer

SIZE = (32, 64)
TINY = get_preset("tiny")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_tools import cityscapes, common, synthetic

    root = tmp_path_factory.mktemp("segmenter")
    for split, count, seed in (("train", 24, 0), ("val", 6, 1000)):
        synthetic.generate(str(root / "raw"), split, count, *SIZE, seed=seed)
        common.convert(cityscapes.make_source(str(root / "raw"), split), str(root / "tfr"), split, num_shards=1)
    config = segmenter.SegmenterConfig(num_classes=19, widths=(8, 16, 32), steps=250, batch_size=8, learning_rate=3e-3)
    model = segmenter.train_segmenter(
        config, data.make_dataset(str(root / "tfr"), "train", batch_size=8, seed=0), quiet
    )
    export = segmenter.export_segmenter(model, str(root / "segmenter"), labels.CITYSCAPES, config)
    # A tiny CRN trained briefly with the image-space loss (no VGG: cheap): it learns the classes' colours.
    train_config = TrainConfig(
        batch_size=8, learning_rate=1e-2, steps=40, loss="image", vgg_weights="none", checkpoint_every=40,
        summary_every=40, image_every=40,
    )  # fmt: skip
    trainer = Trainer(TINY, train_config, str(root / "crn"), log=quiet)
    trainer.train(data.make_dataset(str(root / "tfr"), "train", batch_size=8, config=TINY, image_size=SIZE, seed=0))
    save_model_dir(trainer.model, str(root / "model"), step=40)
    return types.SimpleNamespace(root=root, data_dir=str(root / "tfr"), export=export, model_dir=str(root / "model"))


def val_batches(world, batch_size=3):
    return data.make_dataset(world.data_dir, "val", batch_size=batch_size, config=TINY, image_size=SIZE, training=False)


@pytest.mark.slow
def test_real_photos_score_highest_and_a_trained_crn_beats_an_untrained_one(world, capsys):
    """crn-eval --segmenter on the trained CRN's model_dir; the library call on an untrained CRN."""
    from absl import flags

    fv = flags.FlagValues()
    ev.define_flags(fv)
    args = [f"--model_dir={world.model_dir}", f"--data_dir={world.data_dir}", f"--size={SIZE[0]}x{SIZE[1]}"]
    fv(["crn-eval", *args, "--batch_size=3", "--vgg_weights=none", "--baseline", f"--segmenter={world.export}"])
    ev.main(["crn-eval"], fv)
    trained = json.loads((world.root / "model/eval_val.json").read_text())
    out = capsys.readouterr().out
    assert "identity over all 19 classes" in out and "6/6" in out  # the mapping stated, the progress bar
    assert f"wrote {world.model_dir}/eval_val.json and {world.model_dir}/eval_val.md" in out
    info = trained["segmentation"]["segmenter"]
    assert info["signature"] == "serving_default" and info["input"] == "images" and info["output"] == "logits"
    assert info["label_mapping_pairs"][10] == [10, "sky", 10, "sky"] and info["num_classes"] == 19
    markdown = (world.root / "model/eval_val.md").read_text()
    assert "## Per-class IoU" in markdown and "| road |" in markdown and "miou ↑" in markdown

    seg = segmenter.Segmenter(world.export)
    assert seg.output_kind == "logits" and seg.class_names == labels.CITYSCAPES.class_names
    mapping = segmenter.resolve_label_mapping(seg, labels.CITYSCAPES)
    assert mapping.source.startswith("by class name") and mapping.table.tolist() == list(range(19))

    def segment(images):
        return mapping(seg(images))

    untrained = ev.evaluate(CascadedRefinementNetwork(TINY), val_batches(world), vgg=None, segmenter=segment)
    rows = trained["rows"]
    assert set(rows) == {"model", "baseline_class_mean_colour", "real_photos"} and trained["count"] == 6
    real, crn, fresh = rows["real_photos"], rows["model"], untrained["rows"]["model"]
    assert real["miou"] > crn["miou"] > fresh["miou"]
    assert real["pixel_accuracy"] > crn["pixel_accuracy"] > fresh["pixel_accuracy"]
    assert real["pixel_accuracy"] > 0.7  # the segmenter works on the scenes it was trained for
    assert real["l1"] is None and rows["baseline_class_mean_colour"]["miou"] is not None
    # The real photos' figures do not depend on the model: the same ceiling in both runs (the
    # segmenter's float kernels may round differently between the CLI's process state and here).
    assert untrained["rows"]["real_photos"]["miou"] == pytest.approx(real["miou"], abs=1e-3)

    # The ceiling against a direct count over the whole split (void excluded). Tolerances: the
    # segmenter runs again here, and multi-threaded kernels may flip the argmax of a near-tie pixel
    # (1e-3 of the 12,288 pixels is 12 of them; a class of 27 pixels moves its IoU by ~0.04 a pixel).
    truth, predicted = [], []
    for batch in val_batches(world):
        truth.append(batch["label_ids"].numpy())
        predicted.append(segment(batch["image"]).numpy())
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    valid = truth < 19
    ceiling = untrained["rows"]["real_photos"]
    assert ceiling["pixel_accuracy"] == pytest.approx(float((truth == predicted)[valid].mean()), abs=1e-3)
    per_class = untrained["segmentation"]["per_class_iou"]["real_photos"]
    for c in range(19):
        tp = np.sum(valid & (truth == c) & (predicted == c))
        union = np.sum(valid & ((truth == c) | (predicted == c)))
        if np.any(valid & (truth == c)):
            assert per_class[c] == pytest.approx(tp / union, abs=0.1)
        elif union == 0:  # absent from truth and prediction: no IoU (0.0 only if a near-tie pixel flipped to it)
            assert per_class[c] in (None, 0.0)
    assert untrained["segmentation"]["ground_truth_pixels"][10] == int(np.sum(truth == 10))  # sky
    table = ev.format_class_table(untrained)
    assert "| sky |" in table and "| **mean IoU** |" in table and "real_photos" in table.splitlines()[0]


class _ManyHeads(tf.Module):
    """Segmentation-like signatures to test discovery: ids at half size, two float heads, 34 labelIds."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="image")])
    def ids(self, image):
        # Class 0 where red > 128, else 10, at half resolution.
        half = image[:, ::2, ::2, 0]
        return {"class_ids": tf.where(half > 128, 0, 10)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    def two_heads(self, pixels):
        shape = tf.concat([tf.shape(pixels)[:3], [19]], 0)
        return {"a": tf.zeros(shape), "b": tf.ones(shape)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    def labelids(self, pixels):
        # Every pixel labelId 26 (car, train id 13); the road logit (labelId 7) second.
        shape = tf.shape(pixels)[:3]
        return {"scores": tf.one_hot(tf.fill(shape, 26), 34) + 0.5 * tf.one_hot(tf.fill(shape, 7), 34)}


@pytest.fixture(scope="module")
def many_heads(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("heads") / "saved")
    module = _ManyHeads()
    tf.saved_model.save(module, path, signatures={"ids": module.ids, "two_heads": module.two_heads,
                                                   "labelids": module.labelids})  # fmt: skip
    return path


def test_segmenter_discovery_and_its_errors(many_heads, tmp_path):
    with pytest.raises(ValueError, match=r"has signatures \['ids', 'labelids', 'two_heads'\]; .*--segmenter_signature"):
        segmenter.Segmenter(many_heads)
    with pytest.raises(ValueError, match="outputs a float32 .*, b float32 .*--segmenter_output"):
        segmenter.Segmenter(many_heads, signature="two_heads")
    assert segmenter.Segmenter(many_heads, signature="two_heads", output_name="b").num_classes == 19
    with pytest.raises(ValueError, match="--segmenter_signature='nope'"):
        segmenter.Segmenter(many_heads, signature="nope")
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        segmenter.Segmenter(str(tmp_path))

    ids = segmenter.Segmenter(many_heads, signature="ids")
    assert ids.output_kind == "ids" and ids.num_classes is None and ids.input_dtype == tf.float32
    images = np.zeros([1, 4, 6, 3], np.float32)
    images[0, :2, :, 0] = 255  # red top half
    predicted = ids(images).numpy()
    assert predicted.shape == (1, 4, 6)  # half-size ids resized back (nearest)
    assert (predicted[0, :2] == 0).all() and (predicted[0, 2:] == 10).all()
    mapping = segmenter.resolve_label_mapping(ids, labels.CITYSCAPES)  # unknown count, no names: assumed
    assert mapping.source == "assumed identity" and "pass --segmenter_label_map" in mapping.statement["text"]

    resized = segmenter.Segmenter(many_heads, signature="ids", size=(8, 12))
    assert (resized(images).numpy() == predicted).all()  # bilinear up, segmenter, nearest back


def test_label_mappings_are_checked_and_stated(many_heads, tmp_path):
    seg = segmenter.Segmenter(many_heads, signature="labelids")
    assert seg.num_classes == 34 and seg.output_kind == "logits" and seg.output_name == "scores"
    with pytest.raises(
        ValueError, match="outputs 34 classes but the label space 'cityscapes' has 19.*--segmenter_label_map"
    ):
        segmenter.resolve_label_mapping(seg, labels.CITYSCAPES)
    mapping = segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, "cityscapes_labelids")
    assert mapping.table[26] == 13 and mapping.table[7] == 0 and mapping.table[0] == labels.VOID_ID
    assert mapping(seg(np.zeros([1, 2, 2, 3], np.uint8))).numpy().tolist() == [[[13, 13], [13, 13]]]
    text = mapping.statement["text"]
    assert "--segmenter_label_map=cityscapes_labelids" in text and "19 of 34 segmenter classes mapped" in text

    # A JSON map: labelId 26 -> car, the rest unmapped (wrong wherever predicted); classes it cannot reach stated.
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"26": 13, "7": 255}))
    mapping = segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, str(path))
    assert mapping.table.tolist().count(13) == 1 and "road" in mapping.statement["unreachable_classes"]
    path.write_text(json.dumps({"40": 1}))
    with pytest.raises(ValueError, match=r"map.json: pairs \{40: 1\} are outside the segmenter's ids 0..33"):
        segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, str(path))
    with pytest.raises(ValueError, match="expected identity, cityscapes_labelids or a JSON file"):
        segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, str(tmp_path / "missing.json"))
    # Identity on purpose: segmenter ids 19..33 have no counterpart.
    identity = segmenter.resolve_label_mapping(seg, labels.CITYSCAPES, "identity")
    assert identity.statement["unmapped_segmenter_ids"] == list(range(19, 34))
