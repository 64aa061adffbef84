"""What a model_dir records about the runs that trained it, and its checkpoint housekeeping: the training-config
history (one entry per start), the model-config check before a resume, and setting unreadable checkpoints aside.
"""

from __future__ import annotations

import dataclasses
import json
import time

import tensorflow as tf

from crn_tf import fileio
from crn_tf.config import CRNConfig
from crn_tf.model_dir import checkpoint_files

TRAIN_CONFIG_FILENAME = "train_config.json"  # the latest run's TrainConfig
TRAIN_HISTORY_FILENAME = "train_config_history.json"  # every run's: when, from which checkpoint, what changed


def config_conflicts(saved: CRNConfig, wanted: CRNConfig) -> list[str]:
    """The fields on which two model configs differ, as readable strings."""
    a, b = saved.to_dict(), wanted.to_dict()
    # Label spaces compare by content: a model_dir from before configs recorded their classes names a
    # built-in space, which equals the same space recorded in full.
    conflicts = [
        f"{k}: saved {a[k]!r}, requested {b[k]!r}"
        for k in sorted(a)
        if a[k] != b[k] and k not in ("name", *_SPACE_KEYS)
    ]
    try:
        same_space = saved.get_label_space() == wanted.get_label_space()
    except ValueError:  # an old config naming a palette JSON that is gone
        same_space = all(a[k] == b[k] for k in _SPACE_KEYS)
    if not same_space:
        conflicts.append(
            f"label space: saved {a['label_space']!r} ({a['num_classes']} classes), requested {b['label_space']!r} "
            f"({b['num_classes']} classes)"
        )
    return conflicts


_SPACE_KEYS = ("label_space", "classes")


def previous_run(model_dir: str) -> tuple[dict | None, str]:
    """The training config of the run that wrote this model_dir's checkpoints (the history's last), and
    the Keras backend it ran on (history entries from before the backend was recorded, and model_dirs
    from before the history: TensorFlow, the only one then)."""
    history = f"{model_dir}/{TRAIN_HISTORY_FILENAME}"
    if tf.io.gfile.exists(history):
        entries = fileio.read_json(history)
        return (
            (entries[-1]["train_config"], entries[-1].get("backend", "tensorflow")) if entries else (None, "tensorflow")
        )
    path = f"{model_dir}/{TRAIN_CONFIG_FILENAME}"  # model_dirs from before the history
    return (fileio.read_json(path) if tf.io.gfile.exists(path) else None), "tensorflow"


def record_run(
    model_dir: str,
    train_config,
    previous: dict | None,
    resumed_from: str | None,
    step: int,
    data_config=None,
    backend: str | None = None,
) -> list[str]:
    """Appends this run's training config (and data config) to the history; returns a line naming what changed.

    Args:
        train_config, data_config: the run's TrainConfig and DataConfig (None: not recorded).
        previous: the previous run's training config (previous_run), compared only on a resume.
        resumed_from: the checkpoint resumed from (None: a fresh start).
        step: the step the run starts at.
        backend: the Keras backend the run trains on (recorded; None: not recorded).
    """
    current = json.loads(json.dumps(dataclasses.asdict(train_config)))  # tuples as JSON lists
    changed = {}
    if previous is not None and resumed_from:
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                changed[key] = [previous.get(key), current.get(key)]
    path = f"{model_dir}/{TRAIN_HISTORY_FILENAME}"
    history = fileio.read_json(path) if tf.io.gfile.exists(path) else []
    history.append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed_from": resumed_from,
            "step": step,
            "changed": changed,
            "train_config": current,
            **({"backend": backend} if backend is not None else {}),
            **({"data": dataclasses.asdict(data_config)} if data_config is not None else {}),
        }
    )
    tf.io.gfile.makedirs(model_dir)
    fileio.write_json(path, history)
    fileio.write_json(f"{model_dir}/{TRAIN_CONFIG_FILENAME}", current)  # the latest run's
    if not changed:
        return []
    return ["changed since the last run: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())]


def set_aside_unreadable(model_dir: str, unreadable: list[str], readable: list[str]) -> str:
    """Renames unreadable checkpoints' files to *.unreadable (kept, not deleted) and makes the newest readable
    one the latest, so that a CheckpointManager made afterwards neither resumes from nor rotates by them."""
    for prefix in unreadable:
        for path in checkpoint_files(prefix):
            if tf.io.gfile.exists(path):
                tf.io.gfile.rename(path, path + ".unreadable", overwrite=True)
    state = tf.train.get_checkpoint_state(model_dir)
    stamps = dict(zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)) if state else {}
    oldest_first = list(reversed(readable))
    # With timestamps: a CheckpointManager pairs paths with them and drops paths that have none.
    tf.compat.v1.train.update_checkpoint_state(
        model_dir,
        readable[0],
        all_model_checkpoint_paths=oldest_first,
        all_model_checkpoint_timestamps=[stamps.get(p, time.time()) for p in oldest_first],
    )
    return f"moved the unreadable checkpoint files aside (*.unreadable): {', '.join(unreadable)}"


def delete_checkpoints(prefixes) -> None:
    """Deletes the files of these checkpoints by name.

    A CheckpointManager deletes the checkpoints it rotates out by glob, which matches nothing when the
    model_dir's name has glob characters (`run[1]/` kept them all).
    """
    for prefix in prefixes:
        for file in checkpoint_files(prefix):
            if tf.io.gfile.exists(file):
                tf.io.gfile.remove(file)
