"""Model directories: a CRN's config and checkpoints on disk, read and written with TensorFlow.

A model_dir holds `crn_config.json` (the CRNConfig, with the full label space in `classes`: names
and colours, so nothing outside the model_dir is needed; older ones name a built-in space) and TF
checkpoints `ckpt-<step>` written by a
tf.train.CheckpointManager whose tf.train.Checkpoint has the generator under the key `model`
(training adds optimizer, step and loss state beside it). Training, import, export and synthesis
all read and write this layout.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import keras
import tensorflow as tf

from crn_tf import fileio
from crn_tf.config import CHECKPOINT_PREFIX, CONFIG_FILENAME, CRNConfig
from crn_tf.model import CascadedRefinementNetwork


def save_config(config: CRNConfig, model_dir: str) -> None:
    """Writes `model_dir/crn_config.json` atomically, with the whole label space (names and colours)."""
    if config.classes is None:  # a built-in's name or a palette JSON's path: record what it means today
        config = config.with_label_space(config.get_label_space())
    tf.io.gfile.makedirs(model_dir)
    fileio.write_json(f"{model_dir}/{CONFIG_FILENAME}", config.to_dict())


def load_config(model_dir: str) -> CRNConfig:
    """Reads the CRNConfig of a model_dir, with an error naming the file if it is missing or wrong."""
    path = f"{model_dir}/{CONFIG_FILENAME}"
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{model_dir} is not a crn_tf model_dir: {CONFIG_FILENAME} not found")
    try:
        return CRNConfig.from_dict(fileio.read_json(path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid CRN config ({e})") from e


class CheckpointUnreadable(ValueError):
    """A checkpoint whose files are missing, truncated or corrupt."""


def checkpoints(model_dir: str) -> list[str]:
    """The checkpoint prefixes of a model_dir whose index file exists, newest first.

    Paths are taken literally: tf.train.latest_checkpoint globs, so it finds nothing in a directory
    whose name has glob characters (`run[1]/`). The `checkpoint` state file gives the order; without
    one (or if none of the files it names exist), the step numbers in the file names do.
    """
    state = None
    if tf.io.gfile.exists(f"{model_dir}/checkpoint"):
        try:
            state = tf.train.get_checkpoint_state(model_dir)
        except (tf.errors.OpError, ValueError):  # an unreadable state file: go by the file names
            state = None
    prefixes = []
    if state is not None and state.all_model_checkpoint_paths:
        prefixes = list(reversed(state.all_model_checkpoint_paths))
        if state.model_checkpoint_path and state.model_checkpoint_path in prefixes:
            prefixes.remove(state.model_checkpoint_path)
            prefixes.insert(0, state.model_checkpoint_path)
        prefixes = [p for p in prefixes if tf.io.gfile.exists(p + ".index")]
    if not prefixes:  # no state file, or it names files elsewhere (e.g. the model_dir was moved)
        numbered = []
        for name in tf.io.gfile.listdir(model_dir) if tf.io.gfile.isdir(model_dir) else []:
            stem, number = name[: -len(".index")], name[len(CHECKPOINT_PREFIX) + 1 : -len(".index")]
            if name.endswith(".index") and stem.startswith(f"{CHECKPOINT_PREFIX}-") and number.isdigit():
                numbered.append((int(number), f"{model_dir}/{stem}"))
        prefixes = [p for _, p in sorted(numbered, reverse=True)]
    return prefixes


def checkpoint_files(prefix: str) -> list[str]:
    """The files of checkpoint `prefix`: its index and data shards (found by name, not by glob)."""
    directory, base = prefix.rsplit("/", 1) if "/" in prefix else (".", prefix)
    names = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    data = sorted(n for n in names if n.startswith(base + ".data-"))
    return [f"{prefix}.index"] + [f"{directory}/{n}" for n in data]


def _describe_unreadable(prefix: str, readable: str, error: BaseException) -> str:
    """Which file of checkpoint `prefix` is bad, its size, and TensorFlow's reason."""
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    reason = reason.split("}} ")[-1][:300]  # drop TF's function-node prefix

    def sized(path):
        return f"{path} ({tf.io.gfile.stat(path).length} bytes)" if tf.io.gfile.exists(path) else f"{path} (missing)"

    try:
        tf.train.load_checkpoint(readable)  # reads the index only
    except (tf.errors.OpError, ValueError, IndexError):
        index = sized(prefix + ".index")
        return f"checkpoint {prefix} is unreadable: its index {index} is truncated or corrupt ({reason})"
    data = [sized(f) for f in checkpoint_files(prefix)[1:]] or [f"{prefix}.data-00000-of-00001 (missing)"]
    return f"checkpoint {prefix} is unreadable: its data {', '.join(data)} is truncated, missing or corrupt ({reason})"


@contextlib.contextmanager
def _literal_prefix(prefix: str):
    """A prefix TensorFlow's checkpoint reader finds `prefix`'s files by.

    The reader globs `prefix.index`, so under a directory named e.g. `run[1]` it finds nothing. For
    such a local path this links the checkpoint's files into a temporary directory for the read.
    """
    if not set("*?[]") & set(prefix) or "://" in prefix:
        yield prefix
        return
    with tempfile.TemporaryDirectory(prefix="crn_checkpoint_") as tmp:
        for path in checkpoint_files(prefix):
            if os.path.exists(path):
                os.symlink(os.path.abspath(path), os.path.join(tmp, os.path.basename(path)))
        yield os.path.join(tmp, os.path.basename(prefix))


def restore_checkpoint(checkpoint: tf.train.Checkpoint, prefix: str, partial: bool = False):
    """Restores `checkpoint` from `prefix` (its variables must exist: nothing is left deferred).

    A missing, truncated or corrupt file raises CheckpointUnreadable naming it (TensorFlow's own errors
    name none: `IndexError: Read less bytes than requested`). `partial`: the file may hold more (e.g.
    optimizer state) than `checkpoint` wants.
    """
    with _literal_prefix(prefix) as readable:
        try:
            status = checkpoint.restore(readable)
            if partial:
                status.expect_partial()
            status.assert_existing_objects_matched()
        except (tf.errors.OpError, IndexError) as e:
            raise CheckpointUnreadable(_describe_unreadable(prefix, readable, e)) from e
    return status


class CheckpointValues:
    """The tensors of one checkpoint by key, read with TensorFlow's reader (checksums checked) through
    the checkpoint's literal path; for trainers whose variables are not TensorFlow's
    (crn_tf/jax_trainer.py). A missing, truncated or corrupt file raises CheckpointUnreadable naming it.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._link = _literal_prefix(prefix)
        readable = self._link.__enter__()  # left when the reader is closed (or the object collected)
        try:
            self._reader = tf.train.load_checkpoint(readable)
            self.keys = set(self._reader.get_variable_to_shape_map())
        except (tf.errors.OpError, IndexError, ValueError) as e:
            self.close()
            raise CheckpointUnreadable(_describe_unreadable(prefix, readable, e)) from e

    def get(self, key: str):
        try:
            return self._reader.get_tensor(key)
        except (tf.errors.OpError, IndexError) as e:
            raise CheckpointUnreadable(_describe_unreadable(self.prefix, self.prefix, e)) from e

    def close(self) -> None:
        if self._link is not None:
            self._link.__exit__(None, None, None)
            self._link = None


def checkpoint_variable_names(prefix: str) -> list[str]:
    """The variable names a checkpoint holds (literal path, as restore_checkpoint reads it).

    Raises CheckpointUnreadable naming the file if its index cannot be read.
    """
    with _literal_prefix(prefix) as readable:
        try:
            return [name for name, _ in tf.train.list_variables(readable)]
        except (tf.errors.OpError, IndexError) as e:
            raise CheckpointUnreadable(_describe_unreadable(prefix, readable, e)) from e


def latest_checkpoint(path: str) -> str:
    """The newest checkpoint of a model_dir, or `path` itself if it is a checkpoint prefix."""
    if tf.io.gfile.exists(path + ".index"):
        return path
    found = checkpoints(path)
    if not found:
        raise ValueError(f"{path}: no checkpoint found (expected {CHECKPOINT_PREFIX}-N.index files)")
    return found[0]


def load_model(path: str) -> CascadedRefinementNetwork:
    """Loads a generator from a model_dir (latest checkpoint), a checkpoint prefix inside one, or a
    `.keras` file. An unreadable checkpoint raises CheckpointUnreadable naming the file (and, for a
    model_dir, the older checkpoints one could pass instead)."""
    if path.endswith(".keras"):
        model = keras.models.load_model(path)
        if not isinstance(model, CascadedRefinementNetwork):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a CascadedRefinementNetwork")
        return model
    model_dir = path if tf.io.gfile.isdir(path) else path.rsplit("/", 1)[0]
    model = CascadedRefinementNetwork(load_config(model_dir))
    prefix = latest_checkpoint(path)
    try:
        restore_checkpoint(tf.train.Checkpoint(model=model), prefix, partial=True)  # optimizer etc. not needed
    except CheckpointUnreadable as e:
        older = [p for p in checkpoints(model_dir) if p != prefix] if prefix != path else []
        hint = f"; older checkpoints to pass instead: {', '.join(older)}" if older else ""
        raise CheckpointUnreadable(f"{e}{hint}") from e
    return model


def save_model_dir(model: CascadedRefinementNetwork, model_dir: str, step: int = 0) -> str:
    """Writes config and a checkpoint of `model` alone (no optimizer) to `model_dir`; returns its path."""
    save_config(model.crn_config, model_dir)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), model_dir, max_to_keep=None, checkpoint_name=CHECKPOINT_PREFIX
    )
    return manager.save(checkpoint_number=step)


def init_from(model: CascadedRefinementNetwork, source: str) -> tuple[list[str], list[str]]:
    """Copies every weight of every module (and the head) that `source` shares with `model` by name and shape.

    `source` is a model_dir, a checkpoint prefix in one, or a .keras file. Across label spaces the first
    convolution of each module sees other input channels and stays fresh; the rest is copied. Returns
    (copied: modules copied whole, or "name (kept fresh: ...)" for partly copied ones; skipped: modules
    kept fresh whole).
    """
    try:
        if keras.backend.backend() == "tensorflow":
            other = load_model(source)
        else:  # a Keras model on another backend is no tf.train.Checkpoint object: read the values
            from crn_tf.api import load_model as load_any_backend

            other = load_any_backend(source)
    except ValueError as e:
        raise ValueError(f"--init_from={source}: {e}") from e
    copied, skipped = [], []
    for name in list(model.module_names) + ["head"]:
        if not hasattr(other, name):
            skipped.append(name)
            continue
        theirs = {_within(w, name): w for w in getattr(other, name).weights}
        ours = getattr(model, name).weights
        fresh = []
        for w in ours:
            src = theirs.get(_within(w, name))
            if src is None or tuple(src.shape) != tuple(w.shape):
                fresh.append(
                    f"{_within(w, name)} {tuple(w.shape)}" + ("" if src is None else f" vs {tuple(src.shape)}")
                )
            else:
                w.assign(src)
        if not fresh:
            copied.append(name)
        elif len(fresh) == len(ours):
            skipped.append(name)
        else:
            copied.append(f"{name} (kept fresh: {', '.join(fresh)})")
    if not copied:
        raise ValueError(f"--init_from={source}: shares no module with this model ({list(model.module_names)})")
    return copied, skipped


def _within(variable, module: str) -> str:
    """A variable's path inside its module: `conv1/kernel`."""
    return variable.path.split(f"{module}/", 1)[-1]
