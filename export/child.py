"""crn-export's fresh-process checks: they end with the process that started them and write no files.

    status, stdout, stderr = run_child("export.tf1_check", [export_dir, "-"], timeout_s=1800)

runs `python -m export.child export.tf1_check EXPORT_DIR -`: this module's main first starts a thread
that waits on a pipe only the parent holds open, then runs the check module as `__main__`. When the
parent ends, however it ends (SIGKILL included), the pipe reaches EOF and the child exits at once
instead of finishing a check nobody waits for. Inputs travel on stdin and results on stdout (npz
bytes; `-` as the path), so nothing is left in the temporary directory by a killed export.
"""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

import numpy as np

# The child finds the read end of its parent's pipe under this environment variable.
PARENT_FD_ENV = "CRN_EXPORT_PARENT_FD"
# Exit status of a child whose parent ended first.
PARENT_GONE_STATUS = 3


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_with_parent() -> bool:
    """In a child started by `run_child`: exit as soon as the parent's end of the pipe closes.

    Returns:
        Whether a watcher was started (False outside `run_child`).
    """
    fd = os.environ.pop(PARENT_FD_ENV, None)  # not for this process's own children: the fd is not theirs
    if fd is None:
        return False

    def watch(fd: int) -> None:
        while os.read(fd, 4096):  # the parent never writes: b"" = EOF = the parent is gone
            pass
        os._exit(PARENT_GONE_STATUS)  # at once, even while the main thread is inside TensorFlow

    threading.Thread(target=watch, args=(int(fd),), daemon=True, name="exit-with-parent").start()
    return True


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(data: bytes, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=allow_pickle) as arrays:
        return {key: arrays[key] for key in arrays.files}


def write_results(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """A check's results as npz: to `path`, or to stdout for `-` (where `run_child` reads them)."""
    data = npz_bytes(arrays)
    if path == "-":
        with os.fdopen(os.dup(1), "wb") as out:  # fd 1: sys.stdout is stderr here (see main)
            out.write(data)
        return
    import tensorflow as tf  # object-store paths too

    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def read_inputs(path: str) -> dict[str, np.ndarray]:
    """A check's npz inputs: from `path`, or from stdin for `-`."""
    if path == "-":
        return read_npz(sys.stdin.buffer.read())
    with open(path, "rb") as f:
        return read_npz(f.read())


def run_child(
    module: str, args: Sequence[str], stdin: bytes = b"", timeout_s: float | None = None
) -> tuple[int, bytes, str]:
    """Runs `python -m module args...` in a fresh process tied to this one; returns (status, stdout, stderr).

    The child is killed if the timeout passes or this call is interrupted, and exits by itself if this
    process dies.

    Raises:
        subprocess.TimeoutExpired: the child ran longer than `timeout_s` (it was killed).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    read_fd, write_fd = os.pipe()  # both close-on-exec; pass_fds hands only the read end to this child
    env[PARENT_FD_ENV] = str(read_fd)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "export.child", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=(read_fd,),
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except BaseException:  # timeout, Ctrl-C: the check is not wanted any more
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(write_fd)
    return proc.returncode, out, err.decode("utf-8", "replace")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m export.child MODULE [ARGS...]")
    exit_with_parent()  # before the module's imports: TensorFlow alone takes seconds
    sys.stdout = sys.stderr  # stray prints cannot corrupt results written to fd 1
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)
