"""The experiment record: crn-train's flags -> one ExperimentConfig, written into the model_dir, and
`crn-train --flagfile=<model_dir>/flags.txt` resolving to the same run (and resuming it)."""

import json

import pytest
import tensorflow as tf
from absl import flags
from conftest import converted_synthetic

from crn_tf import distribution, experiment, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return converted_synthetic(tmp_path_factory.mktemp("experiment"), [("train", 4, 0), ("val", 2, 1)], 16, 32)


def parsed(*argv):
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["crn-train", *argv])
    return fv


def resolved(fv):
    return experiment.resolve_experiment({n: fv[n].value for n in train.FLAG_NAMES})


def test_flagfile_repeats_the_run_and_the_record_says_how_it_was_made(data_dir, tmp_path):
    model_dir = tmp_path / "run"
    fv = parsed(
        "--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=1", "--batch_size=2",
        "--loss=image", "--widths=16,8,8", "--train_modules=2", "--clip_norm=1.5", "--nojit_compile",
        "--image_every=100000", "--size=16x32",
    )  # fmt: skip
    first = resolved(fv)
    assert first.training.steps == 2  # 1 epoch of 4 examples at batch 2
    assert first.data.examples == 4 and first.data.size == (16, 32) and first.data.split == "train"
    assert first.model.widths == (16, 8, 8) and first.training.train_modules == ("module_8x16", "module_16x32", "head")
    lines = []
    train.train_experiment(first, train.flags_text(fv), log=lines.append)
    assert any(line.startswith("data: ") for line in lines)  # printed at the start, next to model and training
    assert any(line.startswith("inter-op threads: ") for line in lines)
    assert any(line.startswith("convolutions: ") for line in lines)  # the form the step's convolutions take

    record = json.loads((model_dir / experiment.EXPERIMENT_FILENAME).read_text())
    assert sorted(record) == ["backend", "data", "loss", "model", "model_dir", "training"]
    assert record["backend"] == "tensorflow"
    assert record["data"]["data_dir"] == data_dir and record["data"]["size"] == [16, 32]
    assert record["loss"]["loss"] == "image" and record["training"]["clip_norm"] == 1.5
    assert record["model"]["widths"] == [16, 8, 8]

    again = parsed(f"--flagfile={model_dir / experiment.FLAGS_FILENAME}")
    assert resolved(again) == first  # the same model, data, loss and training

    # Resuming through the flagfile (with one more epoch) adds a history entry naming the change.
    resumed = parsed(f"--flagfile={model_dir / experiment.FLAGS_FILENAME}", "--epochs=2")
    train.train_experiment(resolved(resumed), train.flags_text(resumed), log=lines.append)
    history = json.loads((model_dir / train.TRAIN_HISTORY_FILENAME).read_text())
    assert [entry["resumed_from"] is not None for entry in history] == [False, True]
    assert history[1]["changed"] == {"steps": [2, 4]} and history[1]["data"]["size"] == [16, 32]
    assert [entry["backend"] for entry in history] == ["tensorflow", "tensorflow"]
    assert "--epochs=2.0" in (model_dir / experiment.FLAGS_FILENAME).read_text()


def test_bad_flags_name_the_flag(data_dir, tmp_path):
    fv = parsed("--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={tmp_path}", "--steps=2", "--epochs=1")
    with pytest.raises(ValueError, match="exactly one of --steps and --epochs"):
        resolved(fv)
    fv = parsed("--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={tmp_path}", "--steps=2", "--size=16")
    with pytest.raises(ValueError, match="--size"):
        resolved(fv)
    fv = parsed(
        "--preset=tiny", f"--data_dir={data_dir}", f"--model_dir={tmp_path}", "--steps=2", "--inter_op_threads=-1"
    )
    with pytest.raises(ValueError, match="--inter_op_threads must be >= 0"):
        resolved(fv)
    # Set too late (TensorFlow has started in this process): an explicit value is an error, the default is not.
    float(tf.constant(1.0) + 1.0)
    with pytest.raises(ValueError, match="--inter_op_threads=7: TensorFlow has already started in this process"):
        distribution.configure_threads(7)
    assert distribution.configure_threads(None) == "inter-op threads: TensorFlow's choice"
