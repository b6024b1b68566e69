import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from medpipe.data.download import DownloadError, fetch
from medpipe.data.registry import SourceFile

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def source(name="data.bin", payload=PAYLOAD, urls=()):
    return SourceFile(name=name, checksum="sha256:" + hashlib.sha256(payload).hexdigest(), urls=tuple(urls))


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD, honouring `Range: bytes=N-`; records the ranges asked for."""

    ranges: list = []

    def do_GET(self):  # noqa: N802
        start = 0
        header = self.headers.get("Range")
        RangeHandler.ranges.append(header)
        if header:
            start = int(header.split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data.bin"
    httpd.shutdown()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv("MEDPIPE_DATA_MIRROR", str(folder))
    return folder


def test_copy_from_mirror_verifies_checksum(tmp_path, mirror):
    (mirror / "data.bin").write_bytes(PAYLOAD)
    path = fetch(source(), tmp_path / "raw", tmp_path / "partial")
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_fails_and_leaves_no_file(tmp_path, mirror):
    (mirror / "data.bin").write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(DownloadError, match="checksum mismatch.*data.bin"):
        fetch(source(), tmp_path / "raw", tmp_path / "partial")
    assert list((tmp_path / "raw").iterdir()) == []


def test_missing_everywhere_names_the_file_and_the_mirror(tmp_path, mirror):
    with pytest.raises(DownloadError, match=r"cannot fetch data.bin: it is not in the offline copy folder .*neither a public source nor a URL.*Two ways"):
        fetch(source(), tmp_path / "raw", tmp_path / "partial")


def test_unreachable_url_is_reported_not_hung(tmp_path, mirror):
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        fetch(source(urls=["http://127.0.0.1:9/data.bin"]), tmp_path / "raw", tmp_path / "partial", timeout=5)


def test_download_resumes_from_a_partial_file(tmp_path, mirror, server):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data.bin.part").write_bytes(PAYLOAD[:1000])  # an interrupted earlier run
    path = fetch(source(urls=[server]), tmp_path / "raw", partial)
    assert path.read_bytes() == PAYLOAD
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert not (partial / "data.bin.part").exists()


def test_corrupt_partial_file_is_discarded(tmp_path, mirror, server):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data.bin.part").write_bytes(b"\xff" * 1000)  # wrong bytes: the result cannot verify
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(source(urls=[server]), tmp_path / "raw", partial)
    assert not (partial / "data.bin.part").exists()  # so the next run starts over
    assert fetch(source(urls=[server]), tmp_path / "raw", partial).read_bytes() == PAYLOAD


def test_existing_verified_file_is_kept(tmp_path, mirror):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "data.bin").write_bytes(PAYLOAD)
    assert fetch(source(), raw, tmp_path / "partial") == Path(raw / "data.bin")
