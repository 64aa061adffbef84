"""Small tf.io.gfile helpers (local paths and gs:// alike): atomic writes and JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import uuid
import weakref

import tensorflow as tf


def temporary_name(path: str) -> str:
    """A sibling name for writing `path` before renaming it into place."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` through a temporary file and a rename: readers never see half a file."""
    tmp = temporary_name(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with tf.io.gfile.GFile(tmp, mode) as f:
            f.write(data)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise


def replace_directory(tmp: str, final: str) -> None:
    """Renames the finished directory `tmp` to `final`. An existing `final` is moved aside first and
    deleted only once the new one is in place (and moved back if the rename fails)."""
    if not tf.io.gfile.exists(final):
        tf.io.gfile.rename(tmp, final)
        return
    old = temporary_name(final) + ".old"
    tf.io.gfile.rename(final, old)
    try:
        tf.io.gfile.rename(tmp, final)
    except BaseException:
        tf.io.gfile.rename(old, final)
        raise
    tf.io.gfile.rmtree(old)


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """Linux renameat2(RENAME_NOREPLACE): True if renamed, False if this system or file system lacks it.

    Raises:
        FileExistsError: `dst` exists.
    """
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    raise FileExistsError(err, os.strerror(err), dst) if err == errno.EEXIST else OSError(err, os.strerror(err), src)


def rename_no_replace(src: str, dst: str) -> None:
    """Renames `src` (a file or directory) to `dst` unless `dst` exists; atomically so on local Linux
    file systems (renameat2), where a plain rename would replace an empty directory at `dst`.

    Raises:
        FileExistsError: `dst` exists (nothing was renamed).
    """
    if "://" not in src and _renameat2_noreplace(src, dst):
        return
    if tf.io.gfile.exists(dst):  # object stores, old kernels: check, then rename
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    tf.io.gfile.rename(src, dst, overwrite=False)


# What TensorFlow's pattern matching (tf.io.gfile.glob, Env::GetMatchingPaths) reads as a pattern.
GLOB_CHARACTERS = frozenset("*?[]\\")


def has_glob_characters(path: str) -> bool:
    return bool(GLOB_CHARACTERS & set(path))


@contextlib.contextmanager
def literal_path(path: str):
    """`path` under a name that TensorFlow's globbing readers take literally, for the `with` block.

    Checkpoint and SavedModel readers (tf.saved_model.load, the TF1 SavedModel loader, Saver.restore,
    tf.train.load_checkpoint, ...) glob what they are given, so under a folder named e.g. `run[1]` or
    `a *b?` they find nothing or the wrong files. For a local `path` with glob characters this yields
    a path through symbolic links in a temporary directory: a link to `path` itself if it exists (a
    file, or a directory such as a SavedModel), else one to its folder (a checkpoint prefix such as
    `run[1]/ckpt-3`), or links to each `<prefix>.*` file if the prefix's own name has glob characters.
    Other paths (no glob characters, `gs://...`) are yielded as they are. An exception raised in the
    block gets a note saying which path the temporary one stood for.
    """
    if "://" in path or not has_glob_characters(path):
        yield path
        return
    folder, name = os.path.split(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="crn_literal_") as tmp:
        if os.path.lexists(path):
            extension = os.path.splitext(name)[1]  # kept: some readers go by it (.keras, .onnx)
            clean = "path" + ("" if has_glob_characters(extension) else extension)
            readable = os.path.join(tmp, name if not has_glob_characters(name) else clean)
            os.symlink(os.path.abspath(path), readable)
        elif not has_glob_characters(name):
            os.symlink(folder, os.path.join(tmp, "folder"))
            readable = os.path.join(tmp, "folder", name)
        else:
            readable = os.path.join(tmp, "prefix")
            for sibling in os.listdir(folder) if os.path.isdir(folder) else []:
                if sibling.startswith(name + "."):
                    os.symlink(os.path.join(folder, sibling), readable + sibling[len(name) :])
        try:
            yield readable
        except Exception as e:  # TensorFlow's message names the temporary path: say what it stands for
            e.add_note(f"({readable} was a temporary link to {path})")
            raise


def load_saved_model(path: str):
    """tf.saved_model.load(path), with `path` taken literally (see `literal_path`).

    The link, if one was needed, lives as long as the loaded object (an asset file is read by its path).
    """
    with contextlib.ExitStack() as stack:
        readable = stack.enter_context(literal_path(path))
        loaded = tf.saved_model.load(readable)
        if readable != path:
            weakref.finalize(loaded, stack.pop_all().close)
    return loaded


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    """Reads a JSON file; a missing or malformed file raises a ValueError naming it."""
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path}: file not found")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def quiet_absl_logging() -> None:
    """CLIs: TensorFlow's INFO lines (checkpoint sharding, ...) off unless --verbosity was given."""
    from absl import flags, logging

    if "verbosity" not in flags.FLAGS or not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
