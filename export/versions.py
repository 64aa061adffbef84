"""Claiming an export version, so that concurrent crn-export runs into one base never collide.

A version N of an export base is claimed by holding an exclusive `flock` on `<base>/N.lock` (a name
TF Serving ignores: not an integer). The claim is what makes a version directory safe to write:

- an automatic version is the first N >= next_version(base) whose lock is free and whose directory does
  not exist, so concurrent exports get distinct versions;
- an explicit `--version` that another live export holds is refused, naming that export;
- the lock dies with its holder (the kernel drops it), so a temporary folder `N.tmp-<pid>-<hex>/` whose
  lock can be taken belongs to a dead export and is removed by the next export (a live export's is not);
  an `N.tmp-...old/` (the old version, moved aside by an interrupted --overwrite) goes back to `N/` if
  `N/` is missing.

Object-store bases (`gs://...`) have no locks: there the check-then-write of the version is not safe
against concurrent exports (documented in the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import socket
import time

import tensorflow as tf

from crn_tf import fileio
from crn_tf.serving_contract import numbered_versions

LOCK_SUFFIX = ".lock"
# fileio.temporary_name("<base>/N") and replace_directory's "<...>.old": what an export leaves if killed.
_TEMPORARY_RE = re.compile(r"^(?P<version>\d+)\.tmp-\d+-[0-9a-f]+(?P<old>\.old)?$")
_LOCK_RE = re.compile(r"^(?P<version>\d+)\.lock$")


class VersionInUseError(ValueError):
    """Another live export holds the version's claim."""


def is_local(path: str) -> bool:
    return "://" not in path


def existing_versions(export_base: str) -> list[int]:
    """Integer-named entries of `export_base` (what TF Serving would serve), sorted."""
    return numbered_versions(export_base)


def next_version(export_base: str) -> int:
    """1 + the largest existing version, or 1."""
    versions = existing_versions(export_base)
    return versions[-1] + 1 if versions else 1


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on `path` (created if missing), or None if another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        # The previous holder unlinks the file before unlocking it: a lock on an unlinked file claims
        # nothing, so check that the path still names the locked file, else lock the new one.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(path: str, fd: int) -> None:
    """Removes the lock file, then releases it (see _try_lock: waiters re-check the path)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _holder(path: str) -> str | None:
    """What the lock file at `path` says of its holder; None if it is gone (the holder has finished).

    A holder writes its line right after taking the lock, so an empty file is read again for a moment.
    """
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        except OSError:
            return "unknown"
        if text or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.01)


@dataclasses.dataclass
class VersionClaim:
    """A claimed version of an export base; `release()` (or leaving the `with`) gives it up.

    Attributes:
        export_base: the base directory.
        version: the claimed version.
        final_dir: `<export_base>/<version>`.
    """

    export_base: str
    version: int
    final_dir: str
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            _unlock(_lock_path(self.export_base, self.version), self._fd)
            self._fd = None

    def __enter__(self) -> VersionClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_path(export_base: str, version: int) -> str:
    return f"{export_base}/{version}{LOCK_SUFFIX}"


def claim_version(export_base: str, version: int | None = None, overwrite: bool = False) -> VersionClaim:
    """Claims `version` (default: the next free one) of an existing `export_base`.

    Raises:
        ValueError: the version exists and `overwrite` is False.
        VersionInUseError: another live export holds the explicit `version`.
    """
    export_base = export_base.rstrip("/")
    local = is_local(export_base)
    candidate = version if version is not None else next_version(export_base)
    while True:
        final_dir = f"{export_base}/{candidate}"
        fd = None
        if local:
            fd = _try_lock(_lock_path(export_base, candidate))
            if fd is None:
                if version is not None:
                    holder = _holder(_lock_path(export_base, candidate))
                    if holder is None:  # its export has just finished: try the lock again
                        continue
                    raise VersionInUseError(
                        f"{final_dir} is being written by another crn-export ({holder}); "
                        "wait for it or choose another --version"
                    )
                candidate += 1
                continue
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        claim = VersionClaim(export_base, candidate, final_dir, fd)
        if tf.io.gfile.exists(final_dir):
            if version is None:  # written meanwhile by an export that has finished: take the next
                claim.release()
                candidate += 1
                continue
            if not overwrite:
                claim.release()
                raise ValueError(
                    f"{final_dir} exists; pass --overwrite to replace that version or choose another --version"
                )
        return claim


def remove_stale_temporaries(export_base: str) -> list[str]:
    """Removes what killed exports left in a local `export_base`, and only that; returns what it removed.

    A `N.tmp-...` folder or `N.lock` file is stale when N's lock is free: its writer is dead. An
    `N.tmp-...old` folder is the old version an interrupted --overwrite moved aside: it is renamed
    back to `N` if `N` is missing, else removed.
    """
    export_base = export_base.rstrip("/")
    if not is_local(export_base) or not os.path.isdir(export_base):
        return []
    by_version: dict[int, list[str]] = {}
    for name in os.listdir(export_base):
        match = _TEMPORARY_RE.match(name) or _LOCK_RE.match(name)
        if match:
            by_version.setdefault(int(match["version"]), []).append(name)
    removed = []
    for version, names in sorted(by_version.items()):
        fd = _try_lock(_lock_path(export_base, version))
        if fd is None:
            continue  # a live export is writing this version
        try:
            final_dir = f"{export_base}/{version}"
            for name in sorted(names, key=lambda n: not n.endswith(".old")):  # restore before removing
                path = f"{export_base}/{name}"
                if name.endswith(LOCK_SUFFIX) or not os.path.exists(path):
                    continue  # lock files: released below
                if name.endswith(".old") and not os.path.exists(final_dir):
                    os.rename(path, final_dir)
                    continue
                tf.io.gfile.rmtree(path)
                removed.append(path)
        finally:
            _unlock(_lock_path(export_base, version), fd)
            if any(n.endswith(LOCK_SUFFIX) for n in names):
                removed.append(_lock_path(export_base, version))
    return removed


def rename_into_place(tmp_dir: str, final_dir: str, overwrite: bool) -> None:
    """Renames the finished `tmp_dir` to `final_dir`; without `overwrite`, never replaces anything there,
    even something that appeared after the version was claimed (by a process that takes no claim)."""
    if overwrite:
        fileio.replace_directory(tmp_dir, final_dir)  # the old version stays until the new one is in
        return
    try:
        fileio.rename_no_replace(tmp_dir, final_dir)
    except FileExistsError as e:
        raise ValueError(
            f"{final_dir} appeared while this export was being written; it was kept, this export was not"
        ) from e
