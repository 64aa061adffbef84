"""crn-import-original --download: a local HTTP server on 127.0.0.1 stands in for the authors' server
and serves a checkpoint of the TF1 reference network of test_convert_original (Adam slots and all).
No test touches anything but loopback. The shipped index files are checked against the presets."""

import contextlib
import http.server
import os
import re
import socket
import threading

import pytest
import test_convert_original as original

from crn_tf import convert_original, download_original
from crn_tf.download_original import DATA_FILE, DownloadError, Release

DATA_PATH = f"/result_test/{DATA_FILE}"


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range support; the server's attributes say what to get wrong."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if server.send_length:
            self.send_header("Content-Length", str(len(body) - start))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if server.drop_at is not None and server.drops > 0:  # the connection dies mid-body
            server.drops -= 1
            self.wfile.write(body[start : server.drop_at])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(files, drop_at=None, drops=1, send_length=True, ranges=True):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.requests = files, []
    server.drop_at, server.drops, server.send_length, server.ranges = drop_at, drops, send_length, ranges
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(Release, data bytes, layout, output) for the k = 1 reference network (3 modules, `tiny` widths)."""
    prefix, layout, expected = original._save_original(
        tmp_path_factory.mktemp("orig"), {4: 16, 8: 16, 16: 8}, k=1, batch=2, seed=1
    )
    with open(os.path.join(os.path.dirname(prefix), DATA_FILE), "rb") as f:
        data = f.read()
    release = Release(name="test", folder="result_test", preset="tiny", index=f"{prefix}.index")
    return release, data, layout, expected


def _import(served, tmp_path, server, **kwargs):
    release = served[0]
    kwargs = {"download_dir": str(tmp_path / "cache"), "base_url": server.url, "progress": False, **kwargs}
    return download_original.import_release(release, str(tmp_path / "model"), log=lambda *a, **k: None, **kwargs)


def _assert_imported(served, tmp_path):
    _, _, layout, expected = served
    original._assert_close(original._crn_images(tmp_path / "model", layout, 1)[:, 0], expected)
    folder = tmp_path / "cache" / "result_test"
    assert sorted(p.name for p in folder.iterdir()) == [DATA_FILE, "model.ckpt.index"]  # no .part, no lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model"]  # no temporary model_dir


def test_download_imports_and_matches_the_original(served, tmp_path, capsys):
    _, data, _, _ = served
    with _serve({DATA_PATH: data}) as server:
        result = _import(served, tmp_path, server, progress=True)
        assert server.requests == [(DATA_PATH, None)]  # only the data file: the index ships, no .meta
        assert result.config.name == "tiny"
        _assert_imported(served, tmp_path)
        assert "[####################] 1/1" in capsys.readouterr().out  # the progress bar, in MB
        # A second import uses the download it kept.
        _import(served, tmp_path, server, overwrite=True)
        assert len(server.requests) == 1


def test_dropped_connection_resumes_with_range(served, tmp_path):
    _, data, _, _ = served
    half = len(data) // 2
    with _serve({DATA_PATH: data}, drop_at=half) as server:
        _import(served, tmp_path, server)
        assert server.requests == [(DATA_PATH, None), (DATA_PATH, f"bytes={half}-")]
    _assert_imported(served, tmp_path)


def test_interrupted_run_is_resumed_by_the_next(served, tmp_path):
    _, data, _, _ = served
    with _serve({DATA_PATH: data}, drop_at=1000) as server:
        with pytest.raises(DownloadError, match=r"dropped 1 times; 1000 of \d+ bytes are kept in .*\.part"):
            _import(served, tmp_path, server, attempts=1)
        part = tmp_path / "cache" / "result_test" / f"{DATA_FILE}.part"
        assert part.stat().st_size == 1000 and not (tmp_path / "model").exists()
        _import(served, tmp_path, server)
        assert server.requests[-1] == (DATA_PATH, "bytes=1000-")
    _assert_imported(served, tmp_path)


def test_server_without_range_support_starts_over(served, tmp_path):
    _, data, _, _ = served
    with _serve({DATA_PATH: data}, drop_at=1000, ranges=False) as server:
        _import(served, tmp_path, server)
        assert [r for _, r in server.requests] == [None, "bytes=1000-"]  # answered 200: whole file again
    _assert_imported(served, tmp_path)


def test_complete_part_file_of_unknown_size(served, tmp_path):
    """Without an expected size, a .part that already holds the whole file gets 416 and is kept."""
    _, data, _, _ = served
    (tmp_path / "f.part").write_bytes(data)
    with _serve({DATA_PATH: data}) as server:
        assert download_original.download_file(server.url + DATA_PATH, str(tmp_path / "f"), progress=False) == len(data)
        assert server.requests == [(DATA_PATH, f"bytes={len(data)}-")]
    assert (tmp_path / "f").read_bytes() == data and not (tmp_path / "f.part").exists()


def test_truncated_file_is_refused(served, tmp_path):
    _, data, _, _ = served
    short = data[:-100]
    # A server whose copy is short says so in its Content-Length: refused before the body is read.
    with _serve({DATA_PATH: short}) as server:
        message = rf"{DATA_PATH}: the server offers {len(short)} bytes, the checkpoint's index expects {len(data)}"
        with pytest.raises(DownloadError, match=message):
            _import(served, tmp_path, server)
    # One that sends no Content-Length: the short body may be a dropped connection, so it is resumed;
    # the server has no more (416), and the file is refused and removed.
    with _serve({DATA_PATH: short}, send_length=False) as server:
        message = rf"{DATA_FILE}: truncated: the server sent {len(short)} bytes, .* has {len(data)} bytes; refused"
        with pytest.raises(DownloadError, match=message):
            _import(served, tmp_path, server)
        assert server.requests == [(DATA_PATH, None), (DATA_PATH, f"bytes={len(short)}-")]
    assert sorted(p.name for p in (tmp_path / "cache" / "result_test").iterdir()) == ["model.ckpt.index"]
    assert not (tmp_path / "model").exists()


def test_damaged_download_is_named(served, tmp_path):
    """Right size, wrong bytes: TF's checksums catch it when the import reads the tensors."""
    _, data, _, _ = served
    damaged = bytes(b ^ 0xFF for b in data)
    with _serve({DATA_PATH: damaged}) as server:
        message = r"cannot read g_4_conv1/weights .*Checksum does not match.*Delete .*data-00000-of-00001 and run again"
        with pytest.raises(DownloadError, match=message):
            _import(served, tmp_path, server)
    assert not (tmp_path / "model").exists()


def test_no_network_and_http_errors_are_named(served, tmp_path):
    port = _closed_port()
    release = served[0]
    with pytest.raises(
        DownloadError, match=rf"could not reach 127\.0\.0\.1:{port} \(connection refused\).*no network\?"
    ):
        download_original.fetch_release(release, str(tmp_path / "cache"), f"http://127.0.0.1:{port}", progress=False)
    with _serve({}) as server, pytest.raises(DownloadError, match=rf"{DATA_PATH}: the server answered HTTP 404"):
        _import(served, tmp_path, server)
    with pytest.raises(ValueError, match="--download_base_url='ftp://x': expected an http"):
        download_original.resolve_base_url("ftp://x")


def test_bad_destination_or_preset_is_refused_before_downloading(served, tmp_path):
    release, data, _, _ = served
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    with _serve({DATA_PATH: data}) as server:
        with pytest.raises(ValueError, match="exists and is not empty"):
            _import(served, tmp_path, server)
        with pytest.raises(ValueError, match="does not match preset 'cityscapes_512p'"):
            _import(served, tmp_path, server, preset="cityscapes_512p", overwrite=True)
        assert server.requests == []
    with pytest.raises(ValueError, match="--download=nope: unknown release; expected one of cityscapes_256p"):
        download_original.import_release("nope", str(tmp_path / "other"))


@pytest.mark.parametrize(
    "name, folder, data_bytes",
    [
        ("cityscapes_256p", "result_256p", 1_174_505_804),
        ("cityscapes_512p", "result_512p", 1_183_474_220),
        ("cityscapes_1024p", "result_1024p", 401_201_324),
        ("gta_256p", "result_GTA", 1_174_505_804),
    ],
)
def test_shipped_index_files_match_their_presets(name, folder, data_bytes):
    """The authors' committed index files alone (no data) fix every variable: each matches its preset."""
    release = download_original.RELEASES[name]
    assert (release.folder, release.preset) == (folder, name)
    checkpoint = convert_original.read_original_checkpoint(release.index[: -len(".index")])
    assert convert_original.config_from_preset(checkpoint, name).name == name
    assert download_original.expected_data_size(release.index) == data_bytes


def test_cli_download_names_no_network(tmp_path):
    port = _closed_port()
    done = original._cli(
        "--download=cityscapes_1024p",
        f"--model_dir={tmp_path / 'model'}",
        f"--download_dir={tmp_path / 'cache'}",
        f"--download_base_url=http://127.0.0.1:{port}",
    )
    assert done.returncode != 0
    assert f"crn-import-original: could not reach 127.0.0.1:{port} (connection refused)" in done.stderr
    assert f"http://127.0.0.1:{port}/result_1024p/{DATA_FILE}: no network?" in done.stderr
    assert os.listdir(tmp_path / "cache" / "result_1024p") == ["model.ckpt.index"]
    assert not (tmp_path / "model").exists()
