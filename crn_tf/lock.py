"""One writer at a time: a lock file naming its holder (host, pid), with stale-lock detection.

    lock = ModelDirLock("runs/cs256")
    lock.acquire()   # ModelDirLocked if a live crn-train holds it; a dead holder's lock is taken over
    ...
    lock.release()   # also done at interpreter exit

`DirLock` is the mechanism; `ModelDirLock` (`model_dir/crn-train.lock`, one crn-train per model_dir)
and data_tools' ConversionLock (`output_dir/.{split}.lock`, one crn-convert per split) say what it
guards and which error to raise. The file is JSON {host, pid, process_start, started, command}. On
local disks it is created with O_EXCL, so of two processes racing for it exactly one wins. On other
filesystems (`gs://`) tf.io.gfile has no exclusive create: there the check and the write are two
steps, and two processes started within the same second can both pass (untested). A holder on this
host is stale when its pid is gone, or now belongs to a process that started at another time (pid
reuse, Linux); one on another host cannot be checked from here, so the message says which file to
delete.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
import sys
import time

import tensorflow as tf

from crn_tf import fileio

LOCK_FILENAME = "crn-train.lock"


class LockHeld(ValueError):
    """Another live process holds the lock."""


class ModelDirLocked(LockHeld):
    """Another live run holds the model_dir."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces
    except (OSError, IndexError):
        return None


def _describe(holder: dict) -> str:
    return (
        f"host {holder.get('host')!r}, pid {holder.get('pid')} (since {holder.get('started')}: "
        f"{holder.get('command', '?')})"
    )


class DirLock:
    """A lock file `directory/filename`. Re-entrant within a process (e.g. several Trainers of one process
    share a model_dir's). Subclasses say who uses it and what a refusal says (`busy_error`)."""

    _held: dict[str, int] = {}  # lock path -> how many acquire() calls of this process hold it
    user = "process"  # who takes this lock, for messages

    def __init__(self, directory: str, filename: str):
        self.directory = directory
        self.path = f"{directory}/{filename}"

    def busy_error(self, holder: dict) -> Exception:
        """The error for a live holder."""
        return LockHeld(f"{self.path} is held by {_describe(holder)}; if that process is gone, delete it")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _identity(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
        }

    def _create(self) -> bool:
        """Writes the lock if there is none; False if there is one."""
        text = json.dumps(self._identity(), indent=2) + "\n"
        if "://" in self.path:  # no exclusive create through tf.io.gfile: check, then write
            if tf.io.gfile.exists(self.path):
                return False
            fileio.atomic_write(self.path, text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def read(self) -> dict | None:
        """The holder, or None if there is no lock or it is still being written."""
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                holder = json.loads(f.read())
        except (tf.errors.NotFoundError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict) -> str | None:
        """Why the lock's holder is gone, or None if it may be alive."""
        if holder.get("host") != socket.gethostname():
            return None
        pid = int(holder.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"no process {pid} on this host"
        except PermissionError:  # alive, another user's
            pass
        start = _process_start(pid)
        if holder.get("process_start") and start and start != holder["process_start"]:
            return f"pid {pid} is now another process"
        return None

    def unreadable_error(self) -> Exception:
        """The error for a lock file that stays unreadable (not JSON)."""
        return LockHeld(
            f"{self.path}: an unreadable lock file (not JSON) guards {self.directory}; "
            f"delete it if no {self.user} is running on it"
        )

    def acquire(self, log=print) -> None:
        """Takes the lock, or raises `busy_error` naming its live holder."""
        if self._held.get(self.path):
            self._held[self.path] += 1
            return
        tf.io.gfile.makedirs(self.directory)
        unreadable_since = None
        while not self._create():
            holder = self.read()
            if holder is None:  # just created by another run and not written yet, or damaged
                if unreadable_since is None:
                    unreadable_since = time.monotonic()
                elif time.monotonic() - unreadable_since > 2.0:
                    raise self.unreadable_error()
                time.sleep(0.1)
                continue
            if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                break  # ours, from a lock object this process did not release
            reason = self._stale(holder)
            if reason is None:
                raise self.busy_error(holder)
            log(f"taking over the stale lock {self.path} of {_describe(holder)}: {reason}")
            with contextlib.suppress(tf.errors.NotFoundError):
                tf.io.gfile.remove(self.path)
        self._held[self.path] = 1
        atexit.register(self._release_at_exit)

    def release(self) -> None:
        """Gives the lock back once every acquire() of this process has been released."""
        count = self._held.get(self.path, 0)
        if count > 1:
            self._held[self.path] = count - 1
        elif count == 1:
            self._release_at_exit()

    def _release_at_exit(self) -> None:
        if self._held.pop(self.path, None) is None:
            return
        holder = self.read()
        if holder and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
            with contextlib.suppress(tf.errors.OpError):  # e.g. the directory is already gone
                tf.io.gfile.remove(self.path)


class ModelDirLock(DirLock):
    """`model_dir/crn-train.lock`: one crn-train per model_dir."""

    user = "crn-train"

    def __init__(self, model_dir: str):
        super().__init__(model_dir, LOCK_FILENAME)
        self.model_dir = model_dir

    def busy_error(self, holder: dict) -> Exception:
        return ModelDirLocked(
            f"{self.model_dir} is in use by another crn-train run: {_describe(holder)}. Wait for "
            f"it to end, or train into another --model_dir. If that run is gone (e.g. its machine "
            f"died), delete {self.path}."
        )

    def unreadable_error(self) -> Exception:
        return ModelDirLocked(
            f"{self.path}: an unreadable lock file (not JSON) guards {self.model_dir}; "
            "delete it if no crn-train is running on this model_dir"
        )
