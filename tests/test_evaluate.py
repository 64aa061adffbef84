import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_pairs as _make_pairs

from crn_tf import evaluate as ev
from crn_tf import metrics
from crn_tf.config import get_preset
from crn_tf.model import CascadedRefinementNetwork
from crn_tf.model_dir import save_model_dir
from crn_tf.vgg import VGGFeatures

TINY = get_preset("tiny")


def make_pairs(n, height=16, width=32, seed=0, num_classes=19):
    """conftest's pairs with a void pixel in each layout."""
    return _make_pairs(n, height, width, seed, num_classes, void_corner=True)


def batches(pairs, batch_size):
    return tf.data.Dataset.from_tensor_slices(pairs).batch(batch_size)


class PaintingModel:
    """A stand-in CRN with k outputs: the class-mean painting of the layout, shifted by `offsets`."""

    def __init__(self, means, offsets=(0.0,)):
        self.crn_config = dataclasses.replace(TINY, num_outputs=len(offsets))
        self.means, self.offsets = means, offsets

    def __call__(self, layout, training=False):
        painted = ev.class_mean_prediction(layout, self.means)
        return tf.concat([painted + offset for offset in self.offsets], axis=-1)  # [N, H, W, 3k]


def mean_colour_features(images):
    """A tiny FID feature extractor: per-image channel means and standard deviations, [M, 6]."""
    images = tf.convert_to_tensor(images)
    return tf.concat([tf.reduce_mean(images, [1, 2]), tf.math.reduce_std(images, [1, 2])], axis=-1)


def test_class_mean_colours_by_hand():
    pairs = make_pairs(5)
    means = ev.class_mean_colours(batches(pairs, 2))
    ids = pairs["layout"].argmax(-1)
    assert means.shape == (20, 3)
    for c in (int(ids[0, 5, 5]), 19):  # a present class and void
        np.testing.assert_allclose(means[c], pairs["image"][ids == c].mean(axis=0), rtol=1e-5)
    absent = sorted(set(range(19)) - set(ids.ravel().tolist()))
    if absent:  # classes that never occur fall back to the mean of all pixels
        np.testing.assert_allclose(means[absent[0]], pairs["image"].reshape(-1, 3).mean(0), rtol=1e-5)
    painted = ev.class_mean_prediction(pairs["layout"][:1], means).numpy()
    np.testing.assert_allclose(painted[0, 5, 5], means[ids[0, 5, 5]], rtol=1e-6)


def test_fresh_tiny_model_scored_by_hand_and_loses_to_the_baseline():
    pairs = make_pairs(5)
    model = CascadedRefinementNetwork(TINY)
    vgg = VGGFeatures(weights="none")
    results = ev.evaluate(model, batches(pairs, 2), vgg=vgg, baseline=True)
    assert results["count"] == 5 and results["num_outputs"] == 1 and results["image_size"] == [16, 32]
    assert set(results["rows"]) == {"model", "baseline_class_mean_colour"}
    fake = np.clip(model(pairs["layout"]).numpy(), 0, 255)
    row = results["rows"]["model"]
    assert row["l1"] == pytest.approx(float(np.abs(fake - pairs["image"]).mean()), rel=1e-5)
    assert row["psnr"] == pytest.approx(float(metrics.psnr(fake, pairs["image"]).numpy().mean()), rel=1e-5)
    assert row["ssim"] == pytest.approx(float(metrics.ssim(fake, pairs["image"]).numpy().mean()), rel=1e-4, abs=1e-6)
    perceptual = metrics.perceptual_distance(fake, pairs["image"], vgg, TINY.layer_weights).numpy().mean()
    assert row["perceptual"] == pytest.approx(float(perceptual), rel=1e-4)
    assert row["fid"] is None and "FID skipped" in results["fid"]["note"]
    baseline = results["rows"]["baseline_class_mean_colour"]
    assert baseline["l1"] < row["l1"] and baseline["psnr"] > row["psnr"]  # an untrained CRN paints grey mush
    assert results["perceptual"]["layer_weights"] == list(TINY.layer_weights)
    assert "none (seeded random)" in results["perceptual"]["vgg"]
    json.dumps(results)  # JSON-ready
    table = ev.format_table(results)
    assert table.splitlines()[0].startswith("| row | l1 ↓ | psnr ↑ | ssim ↑ | perceptual ↓ | fid ↓ |")
    assert "| baseline_class_mean_colour |" in table and "n/a" in table


def test_diverse_model_mean_and_best_of_k_and_pooled_fid():
    pairs = make_pairs(4)
    means = ev.class_mean_colours(batches(pairs, 4))
    model = PaintingModel(means, offsets=(0.0, 30.0, -30.0))  # k = 3
    results = ev.evaluate(
        model, batches(pairs, 3), vgg=None, inception=mean_colour_features, class_means=means, fid_note="test"
    )
    rows = results["rows"]
    assert set(rows) == {"model", "model_best_of_k", "baseline_class_mean_colour"}
    # Output 0 is the baseline itself: best-of-k L1 equals the baseline's; the mean is over the three.
    base = np.clip(ev.class_mean_prediction(pairs["layout"], means).numpy(), 0, 255)
    outputs = [np.clip(base + offset, 0, 255) for offset in (0.0, 30.0, -30.0)]
    per_output = np.stack([np.abs(o - pairs["image"]).mean(axis=(1, 2, 3)) for o in outputs], 1)  # [N, 3]
    assert rows["model"]["l1"] == pytest.approx(per_output.mean(), rel=1e-5)
    assert rows["model_best_of_k"]["l1"] == pytest.approx(per_output.min(1).mean(), rel=1e-5)
    assert rows["model_best_of_k"]["l1"] == pytest.approx(rows["baseline_class_mean_colour"]["l1"], rel=1e-5)
    assert rows["model_best_of_k"]["ssim"] >= rows["model"]["ssim"]
    assert rows["model"]["perceptual"] is None and results["perceptual"]["vgg"] == "skipped (no VGG)"
    # FID and KID pool the 4 x 3 outputs (example-major) against the 4 references.
    pooled = mean_colour_features(np.stack(outputs, axis=1).reshape([-1, 16, 32, 3])).numpy()
    reference = mean_colour_features(pairs["image"]).numpy()
    # rel: the features are float32 reductions of 512 pixels, summed in a different order here.
    assert rows["model"]["fid"] == pytest.approx(metrics.fid(pooled, reference), rel=1e-4)
    kid, kid_std = metrics.kernel_inception_distance(pooled, reference)
    assert rows["model"]["kid"] == pytest.approx(kid, rel=1e-4)
    assert results["fid"]["kid_std_over_subsets"]["model"] == pytest.approx(kid_std, rel=1e-3)
    assert rows["model_best_of_k"]["fid"] is None and rows["model_best_of_k"]["kid"] is None
    assert results["fid"]["computed"] and results["fid"]["note"] == f"test. {metrics.OTHER_NETWORK_NOTE}"
    assert results["fid"]["comparable_with_papers"] is False and results["segmentation"] is None
    assert "best output, per metric" in results["aggregation"] and "KID pool all N*k" in results["aggregation"]


def test_max_examples_small_images_and_errors():
    pairs = make_pairs(5, 8, 16)
    model = PaintingModel(np.full([20, 3], 128.0))
    results = ev.evaluate(model, batches(pairs, 2).repeat(), vgg=None, max_examples=3)
    assert results["count"] == 3
    assert results["ssim_window"]["size"] == 7 and any("7x7 window" in n for n in results["notes"])
    with pytest.raises(ValueError, match="repeats forever: pass max_examples"):
        ev.evaluate(model, batches(pairs, 2).repeat(), vgg=None)
    with pytest.raises(ValueError, match=r"class_means must be \[20, 3\]"):
        ev.evaluate(model, batches(pairs, 2), vgg=None, class_means=np.zeros([3, 3]))


def test_flag_parsing_helpers(tmp_path):
    from absl import flags

    assert "perceptual_weights" not in flags.FLAGS  # importing crn_tf.evaluate defines no flags
    assert ev.parse_perceptual_weights("model", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)) == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert ev.parse_perceptual_weights("model", None) == (1.0,) * 6
    assert ev.parse_perceptual_weights("uniform", (2.0,) * 6) == (1.0,) * 6
    assert ev.parse_perceptual_weights("1,0,0,0,0,0.5", None) == (1.0, 0.0, 0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="--perceptual_weights='1,2'"):
        ev.parse_perceptual_weights("1,2", None)
    assert ev.default_output_json(str(tmp_path), "val") == f"{tmp_path}/eval_val.json"
    assert ev.default_output_json(f"{tmp_path}/m.keras", "test") == f"{tmp_path}/eval_test.json"


def test_cli_end_to_end_on_converted_data(tmp_path, monkeypatch, capsys):
    """crn-eval on a real converted split (data_tools -> crn_tf.data), as the demo runs it."""
    from absl import flags

    from data_tools import cityscapes, common, synthetic

    synthetic.generate(str(tmp_path / "raw"), "val", 3, 16, 32, seed=2)
    common.convert(cityscapes.make_source(str(tmp_path / "raw"), "val"), str(tmp_path / "tfr"), "val", num_shards=1)
    model_dir = str(tmp_path / "model")
    save_model_dir(CascadedRefinementNetwork(TINY), model_dir, step=3)
    monkeypatch.setattr(metrics, "keras_cache_dirs", lambda: [str(tmp_path / "no_cache")])

    fv = flags.FlagValues()
    ev.define_flags(fv)
    fv(
        [
            "crn-eval",
            f"--model_dir={model_dir}",
            f"--data_dir={tmp_path / 'tfr'}",
            "--batch_size=2",
            "--vgg_weights=none",
            "--baseline",
        ]
    )
    ev.main(["crn-eval"], fv)
    results = json.loads((tmp_path / "model/eval_val.json").read_text())
    assert results["count"] == 3 and results["split"] == "val" and results["model"] == model_dir
    assert set(results["rows"]) == {"model", "baseline_class_mean_colour"}
    out = capsys.readouterr().out
    assert "| model |" in out and "FID skipped" in out and f"wrote {model_dir}/eval_val.json" in out
