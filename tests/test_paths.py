"""Paths are paths: folders whose names hold glob characters, spaces and non-ASCII letters.

TensorFlow's checkpoint and SavedModel readers glob the path they are given, so under `we[ir]d *dir?`
they find nothing. tests/test_readme.py runs the README's quick start (crn-convert, crn-train,
crn-eval, crn-export with its TF1 check, crn-synthesize from the SavedModel and ONNX, crn-studio) and
tests/test_demo.py the demo (crn-segmenter and crn-eval --segmenter too) under such a folder;
tests/test_train.py resumes and rotates checkpoints under `run[1]/`. This file covers the helper
they rely on (`fileio.literal_path`) and crn-import-original.
"""

import gc
import os
import pathlib
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from crn_tf import fileio

WEIRD = "we[ir]d *dir? ünï"


def _write_checkpoint(prefix) -> str:
    return tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(prefix))


def _value(prefix: str):
    return tf.train.load_checkpoint(prefix).get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE").tolist()


def test_checkpoints_are_read_literally(tmp_path):
    folder = tmp_path / WEIRD
    prefix = _write_checkpoint(folder / "ckpt-1")
    with pytest.raises((tf.errors.NotFoundError, ValueError)):
        _value(prefix)  # why literal_path exists: the reader globs its prefix
    with fileio.literal_path(prefix) as readable:
        assert readable != prefix and not fileio.has_glob_characters(readable)
        assert _value(readable) == [1.0, 2.0]
    assert not os.path.exists(os.path.dirname(os.path.dirname(readable)))  # the links are gone
    # A prefix whose own name has glob characters: its files are linked one by one.
    odd = _write_checkpoint(folder / "ckpt[2] *")
    with fileio.literal_path(odd) as readable:
        assert _value(readable) == [1.0, 2.0]
    plain = _write_checkpoint(tmp_path / "plain/ckpt-1")
    for path in (plain, "gs://bucket/run[1]/ckpt-1"):  # nothing to do / not a local path
        with fileio.literal_path(path) as readable:
            assert readable == path


def test_files_keep_their_extension_and_errors_name_the_real_path(tmp_path):
    path = tmp_path / WEIRD / "model[1].keras"
    path.parent.mkdir()
    path.write_bytes(b"data")
    with fileio.literal_path(str(path)) as readable:
        assert readable.endswith("/path.keras") and pathlib.Path(readable).read_bytes() == b"data"
    with pytest.raises(OSError) as raised, fileio.literal_path(str(path)) as readable:
        pathlib.Path(readable, "not_a_folder").read_bytes()
    assert f"a temporary link to {path}" in str(raised.value.__notes__)


class _Doubler(tf.Module):
    def __init__(self):
        self.factor = tf.Variable(2.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, x):
        return x * self.factor


def test_saved_models_are_loaded_literally(tmp_path, monkeypatch):
    path = str(tmp_path / WEIRD / "model")
    tf.saved_model.save(_Doubler(), path)
    with pytest.raises((FileNotFoundError, tf.errors.NotFoundError, ValueError)):
        tf.saved_model.load(path)
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(links))  # where literal_path makes its links
    loaded = fileio.load_saved_model(path)
    assert loaded(tf.constant([1.0, 3.0])).numpy().tolist() == [2.0, 6.0]
    assert len(os.listdir(links)) == 1  # kept while the loaded object lives (assets are read by path)
    del loaded
    gc.collect()
    assert os.listdir(links) == []


def test_import_original_under_glob_characters(tmp_path):
    """crn-import-original: an original (TF1 Saver) checkpoint in, a model_dir out, both under WEIRD."""
    from crn_tf import convert_original
    from crn_tf.config import get_preset

    config = get_preset("tiny")
    arrays = {n: np.full(s, 0.5, np.float32) for n, s in convert_original.expected_shapes(config).items()}
    folder = tmp_path / WEIRD
    (folder / "original").mkdir(parents=True)
    with tf.Graph().as_default():
        variables = {
            n: tf.compat.v1.get_variable(n.replace("/", "_"), initializer=tf.constant(a)) for n, a in arrays.items()
        }
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = tf.compat.v1.train.Saver(variables).save(sess, str(folder / "original/model.ckpt"))
    for source in (prefix, str(folder / "original")):  # a prefix, and its folder (through the state file)
        result = convert_original.import_original(source, str(folder / "imported"), preset="tiny", overwrite=True)
        assert result.checkpoint == f"{folder}/imported/ckpt-0" and result.num_variables == len(arrays)
