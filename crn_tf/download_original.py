"""The authors' released models in one command: download, check and import.

    crn-import-original --download=cityscapes_512p --model_dir=models/cityscapes_512p

For each release the import needs the TF1 checkpoint's `model.ckpt.index` and
`model.ckpt.data-00000-of-00001`; the `.meta` graph, which the authors' download_models.py also
fetches, is not read by the import and is not downloaded. The index files are committed in the
authors' repository and ship with crn_tf (`crn_tf/original_index/`, see its README); only the data
file (0.4-1.2 GB) is downloaded, into `--download_dir` (default `~/.cache/crn_tf/original`), where
it stays so that a second import needs no download.

Before downloading, the index is checked against the release's preset (every variable and shape)
and the destination model_dir against `--overwrite`. The download goes to `<file>.part`, resumes
it with an HTTP Range request (after a dropped connection, up to `attempts` times per run, and
when the command is run again), shows a progress bar, and is renamed into place only when its size
is the one the index describes (and the server's Content-Length, when it sends one); a shorter
or longer file is refused, naming the file and both sizes. The import then writes the model_dir
under a temporary name and renames it into place (`convert_original.import_original`).

Only the standard library's urllib speaks HTTP. The base URL is `--download_base_url`, else the
environment variable CRN_ORIGINAL_BASE_URL, else the authors' (AUTHORS_BASE_URL).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf

from crn_tf import convert_original, fileio
from crn_tf.lock import DirLock, LockHeld
from crn_tf.progress import Progress

# From download_models.py of github.com/CQFIO/PhotographicImageSynthesis at commit
# e89c281e996aaac8669df0df66fbefec704f0588 (2022-02-08, "update the URLs to download the models"),
# which fetches <AUTHORS_BASE_URL>/<folder>/model.ckpt.data-00000-of-00001 and .../model.ckpt.meta
# for the folders result_1024p, result_512p, result_256p and result_GTA. These URLs were NOT reachable
# from where crn_tf was written (no internet there): only a local test server has exercised this code.
AUTHORS_BASE_URL = "https://cqf.io/data/Tensorflow_models"
BASE_URL_ENV = "CRN_ORIGINAL_BASE_URL"
INDEX_FILE = "model.ckpt.index"
DATA_FILE = "model.ckpt.data-00000-of-00001"
INDEX_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "original_index")
LOCK_FILE = ".download.lock"
CHUNK_BYTES = 1 << 16
MB = 1_000_000  # the progress bar's unit


class DownloadError(Exception):
    """A download failed: no network, an HTTP error status, or a file of the wrong size."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One released generator.

    Attributes:
        name: the `--download` value.
        folder: the folder under the base URL (and under the download dir): `result_512p`.
        preset: the crn_tf preset it is imported as (None: infer the architecture).
        index: the `model.ckpt.index` that describes its data file.
    """

    name: str
    folder: str
    preset: str | None
    index: str


def _packaged(name: str, folder: str) -> Release:
    return Release(name=name, folder=folder, preset=name, index=os.path.join(INDEX_DIR, folder, INDEX_FILE))


RELEASES = {
    r.name: r
    for r in (
        _packaged("cityscapes_256p", "result_256p"),
        _packaged("cityscapes_512p", "result_512p"),
        _packaged("cityscapes_1024p", "result_1024p"),
        _packaged("gta_256p", "result_GTA"),
    )
}


def resolve_base_url(flag_value: str | None = None) -> str:
    """`--download_base_url`, else $CRN_ORIGINAL_BASE_URL, else the authors' server; no trailing slash."""
    url = flag_value or os.environ.get(BASE_URL_ENV) or AUTHORS_BASE_URL
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"--download_base_url={url!r}: expected an http:// or https:// URL")
    return url.rstrip("/")


def default_download_dir() -> str:
    """`$XDG_CACHE_HOME/crn_tf/original`, default `~/.cache/crn_tf/original`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "crn_tf", "original")


def expected_data_size(index: str) -> int:
    """The size of the data file that a (single-shard) checkpoint index describes, in bytes.

    Every tensor of the authors' checkpoints is numeric; its bytes in the data file are its element
    count times its dtype's size, and the data file is those bytes end to end.

    Raises:
        ValueError: the index cannot be read, or holds a tensor whose size it does not fix (strings).
    """
    prefix = index[: -len(".index")] if index.endswith(".index") else index
    try:
        with fileio.literal_path(prefix) as readable:  # the reader globs: `run[1]/` is no pattern
            reader = tf.train.load_checkpoint(readable)
            shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"{prefix}.index: cannot read the checkpoint index ({e})") from e
    variable_size = [n for n, d in dtypes.items() if d == tf.string]
    if variable_size:
        raise ValueError(f"{prefix}.index: string tensors {variable_size[:3]} have no fixed size")
    return sum(int(np.prod(shapes[n], dtype=np.int64)) * dtypes[n].size for n in shapes)


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name: {reason}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(reason) or type(reason).__name__


def _unreachable(url: str, error: BaseException) -> DownloadError:
    host = urllib.parse.urlparse(url).netloc
    return DownloadError(f"could not reach {host} ({_reason(error)}) to download {url}: no network?")


def _content_range(value: str | None, url: str) -> tuple[int, int | None]:
    """`bytes <first>-<last>/<total>` -> (first, total or None for `*`)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        raise DownloadError(f"{url}: the server answered 206 with an unreadable Content-Range {value!r}")
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _too_big(path: str, size: int, expected: int, where: str) -> DownloadError:
    return DownloadError(
        f"{path}: {size} bytes, but {where} says the file has {expected} bytes; refused (not the file this "
        "import needs, or the server's copy is damaged)"
    )


def download_file(
    url: str,
    path: str,
    expected_size: int | None = None,
    *,
    attempts: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    stream=None,
    log=print,
) -> int:
    """Downloads `url` to `path` through `path.part`, resuming it with HTTP Range requests.

    Args:
        url: http(s) URL.
        path: the local file to write (renamed into place when complete and of the right size).
        expected_size: the size the file must have (None: the server's Content-Length, if any).
        attempts: connections tried in this call; each after a dropped one resumes where it stopped.
        timeout: seconds a connection or a read may wait.
        progress: draw a progress bar (on `stream`, default stdout).
        log: print-like function for the one-line messages.

    Returns:
        The file's size in bytes.

    Raises:
        DownloadError: the server is unreachable ("no network?"), answered an HTTP error (named),
            offered a file of another size than expected, the file came out of another size than
            the server or `expected_size` said (named, with both sizes), or the connection dropped
            `attempts` times (the `.part` file is kept; running again resumes it).
    """
    part = path + ".part"
    total = size = expected_size
    for attempt in range(1, attempts + 1):
        have = _size(part)
        if expected_size is not None and have > expected_size:
            log(f"{part}: {have} bytes, more than the {expected_size} expected; starting over")
            os.remove(part)
            have = 0
        if expected_size is not None and have == expected_size:
            break  # a complete .part from an earlier run
        headers = {"User-Agent": "crn_tf", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part already holds all the server has
                unsatisfied = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", e.headers.get("Content-Range") or "")
                if unsatisfied and int(unsatisfied.group(1)) == have:
                    total = have
                    break
            raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            error = _unreachable(url, e)
            if have:
                error = DownloadError(f"{error}; {have} bytes are kept in {part}: run the command again to resume")
            raise error from e
        with response:
            if response.status == 206:
                first, total = _content_range(response.headers.get("Content-Range"), url)
                if first != have:
                    raise DownloadError(f"{url}: asked for bytes from {have}, the server sent from {first}")
                mode = "ab"
                if have:
                    log(f"resuming {part} at {have} of {total if total is not None else '?'} bytes")
            elif response.status == 200:
                if have:
                    log(f"{url}: the server does not resume downloads (no Range support); starting over")
                have, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            else:
                raise DownloadError(f"{url}: the server answered HTTP {response.status} {response.reason}")
            if expected_size is not None and total is not None and total != expected_size:
                raise DownloadError(
                    f"{url}: the server offers {total} bytes, the checkpoint's index expects {expected_size}; "
                    "refused (not the file this import needs, or the server's copy is damaged)"
                )
            size = total if total is not None else expected_size
            bar = Progress(
                max(1, -(-size // MB)) if size else 1, start=have // MB, unit="MB", stream=stream, enabled=progress
            )
            shown = have // MB
            dropped = None
            try:
                with open(part, mode) as f:
                    while chunk := response.read(CHUNK_BYTES):
                        f.write(chunk)
                        have += len(chunk)
                        if have // MB != shown and size:
                            shown = have // MB
                            bar.update(min(shown, bar.total))
            except (OSError, http.client.HTTPException) as e:
                dropped = e
            if progress and size:
                if have >= size and bar.done != bar.total:
                    bar.update(bar.total)
                bar.finish()
        # Without a Content-Length, a body shorter than the index says may be a dropped connection
        # too: the next request resumes it, or gets 416 if the server has no more (refused below).
        if size is not None and have < size:
            why = f" ({_reason(dropped)})" if dropped is not None else ""
            log(f"{url}: the connection dropped at {have} of {size} bytes{why} (attempt {attempt} of {attempts})")
            continue
        if dropped is not None:
            raise DownloadError(f"{url}: the connection dropped at {have} bytes ({_reason(dropped)}); run again")
        break
    else:
        raise DownloadError(
            f"{url}: the connection dropped {attempts} times; {have} of {size} bytes are kept in {part}: "
            "run the command again to resume"
        )
    have = _size(part)
    if expected_size is not None and have != expected_size:
        os.remove(part)
        if have > expected_size:
            raise _too_big(path, have, expected_size, "the checkpoint's index")
        raise DownloadError(
            f"{path}: truncated: the server sent {have} bytes, the checkpoint's index says the file has "
            f"{expected_size} bytes; refused (removed {part})"
        )
    if total is not None and have != total:
        os.remove(part)
        raise DownloadError(f"{path}: {have} bytes, the server said {total} bytes; refused (removed {part})")
    os.replace(part, path)
    return have


class _DownloadLock(DirLock):
    user = "crn-import-original --download"

    def busy_error(self, holder: dict) -> Exception:
        return LockHeld(
            f"{self.directory} is being downloaded into by another process (host {holder.get('host')!r}, pid "
            f"{holder.get('pid')}); wait for it to end. If it is gone, delete {self.path}."
        )


def fetch_release(
    release: Release,
    download_dir: str | None = None,
    base_url: str | None = None,
    *,
    attempts: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log=print,
) -> str:
    """Puts a release's checkpoint (`model.ckpt.index` + `.data-00000-of-00001`) into
    `download_dir/<folder>/`, downloading the data file unless a complete one is there.

    Returns:
        The checkpoint prefix (`<download_dir>/<folder>/model.ckpt`).
    """
    download_dir = download_dir or default_download_dir()
    if "://" in download_dir:
        raise ValueError(f"--download_dir={download_dir}: must be a local directory (downloads resume in place)")
    folder = os.path.join(os.path.abspath(download_dir), release.folder)
    os.makedirs(folder, exist_ok=True)
    with _DownloadLock(folder, LOCK_FILE):
        index = os.path.join(folder, INDEX_FILE)
        index_bytes = _read(release.index)
        if not os.path.exists(index) or _read(index) != index_bytes:
            tmp = f"{index}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(index_bytes)
            os.replace(tmp, index)
        expected = expected_data_size(index)
        data = os.path.join(folder, DATA_FILE)
        if os.path.exists(data):
            if _size(data) == expected:
                log(f"using {data} ({expected / 1e9:.2f} GB, downloaded before)")
                return os.path.join(folder, "model.ckpt")
            log(f"{data}: {_size(data)} bytes, the index says {expected}; downloading it again")
            os.remove(data)
        url = f"{resolve_base_url(base_url)}/{release.folder}/{DATA_FILE}"
        log(f"downloading {url}\n  -> {data} ({expected / 1e9:.2f} GB)")
        download_file(url, data, expected, attempts=attempts, timeout=timeout, progress=progress, log=log)
    return os.path.join(folder, "model.ckpt")


def import_release(
    release: str | Release,
    model_dir: str,
    *,
    download_dir: str | None = None,
    base_url: str | None = None,
    preset: str | None = None,
    label_space: str | None = None,
    overwrite: bool = False,
    attempts: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log=print,
) -> convert_original.ImportResult:
    """Downloads a released checkpoint (unless already downloaded) and imports it into `model_dir`.

    Args:
        release: a RELEASES name (`cityscapes_512p`) or a Release.
        model_dir: the crn_tf model_dir to write (atomically: a temporary name, then a rename).
        download_dir: where the checkpoint is kept (local; default `default_download_dir()`).
        base_url: the server (default: $CRN_ORIGINAL_BASE_URL, else the authors').
        preset: the preset to check against and keep (default: the release's).
        label_space, overwrite: as in `convert_original.import_original`.

    Raises:
        ValueError: an unknown release, a preset the release's index disagrees with, an existing
            model_dir without `overwrite` (all before any download), or the import's errors.
        DownloadError: see `download_file`.
    """
    if isinstance(release, str):
        if release not in RELEASES:
            raise ValueError(f"--download={release}: unknown release; expected one of {', '.join(RELEASES)}")
        release = RELEASES[release]
    preset = preset or release.preset
    resolve_base_url(base_url)  # a bad URL is refused before anything else
    convert_original.check_destination(model_dir.rstrip("/"), overwrite)
    # The index alone fixes every variable's shape: a release that does not fit is refused before
    # gigabytes are downloaded.
    original = convert_original.read_original_checkpoint(release.index[: -len(".index")])
    if preset is not None:
        convert_original.config_from_preset(original, preset, label_space)
    prefix = fetch_release(
        release, download_dir, base_url, attempts=attempts, timeout=timeout, progress=progress, log=log
    )
    try:
        result = convert_original.import_original(
            prefix, model_dir, preset=preset, label_space=label_space, overwrite=overwrite
        )
    except convert_original.CheckpointDataError as e:
        data = os.path.join(os.path.dirname(prefix), DATA_FILE)
        raise DownloadError(
            f"{e}. Delete {data} and run again to download it afresh (if that fails the same way, the "
            f"server's copy differs from the index crn_tf ships: {release.index})"
        ) from e
    log(f"kept the download in {os.path.dirname(prefix)} (delete it to free the space)")
    return result
