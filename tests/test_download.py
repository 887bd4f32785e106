"""Downloads against a local HTTP server (127.0.0.1 only) that can cut transfers short,
honour Range requests, or serve the wrong bytes."""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

import alexnet.download as dl
from alexnet.data import open_cache, prepare
from alexnet.download import download
from alexnet.errors import DataError
from tests.conftest import TINY_COUNTS, quiet
from tests.synth import make_zip
from tests.test_data import snapshot


class Server:
    """Serves `payload` at /tiny-imagenet-200.zip. mode: 'good'; 'cut_first' (the first
    answer announces the full length but stops halfway, later ones are whole and ignore
    Range); 'range' (cut first, then 206 answers to Range requests); 'always_cut'; '404'."""

    def __init__(self, payload: bytes, mode: str) -> None:
        self.payload, self.mode = payload, mode
        self.ranges: list[str | None] = []  # the Range header of each request
        self.statuses: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a stuck client cannot hold a handler thread for long

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                first = not server.ranges
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if server.mode == "404":
                    server.statuses.append(404)
                    self.send_error(404)
                    return
                start = 0
                if server.mode == "range" and rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                body = server.payload[start:]
                server.statuses.append(206 if start else 200)
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "always_cut" or (first and server.mode in ("cut_first", "range")):
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True  # the client sees the connection end early
                else:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny-imagenet-200.zip"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(tiny_zip: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    """serve(mode, payload=tiny zip bytes) -> a running Server, shut down after the test."""
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    servers: list[Server] = []

    def start(mode: str = "good", payload: bytes | None = None) -> Server:
        servers.append(Server(tiny_zip.read_bytes() if payload is None else payload, mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_prepare_from_url(serve: Callable[..., Server], tiny_zip: Path, tiny_cache: Path, tmp_path: Path) -> None:
    server = serve()
    d = prepare(server.url, tmp_path / "c", counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, log=quiet)
    assert (d / "downloads" / dl.download_name(server.url)).read_bytes() == tiny_zip.read_bytes()
    assert not list(d.rglob("*.part"))
    got, ref = open_cache(d), open_cache(tiny_cache)
    np.testing.assert_array_equal(got.train.x, ref.train.x)
    np.testing.assert_array_equal(got.val.y, ref.val.y)
    assert got.manifest["source"]["fingerprint"] == {"url": server.url, "md5": md5_of(tiny_zip)}
    logs: list[str] = []
    prepare(server.url, d, counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, log=logs.append)
    assert any("cache up to date" in m for m in logs) and len(server.ranges) == 1  # no new request


def test_wrong_md5_touches_nothing(serve: Callable[..., Server], tiny_zip: Path, tiny_cache: Path, tmp_path: Path) -> None:
    server = serve()
    d = tmp_path / "c"
    shutil.copytree(tiny_cache, d)
    dest = d / "downloads" / dl.download_name(server.url)
    dest.parent.mkdir()
    dest.write_bytes(b"an older file")
    before = snapshot(d)
    wrong = "0" * 32
    with pytest.raises(DataError) as e:
        prepare(server.url, d, counts=TINY_COUNTS, md5=wrong, workers=1, log=quiet)
    message = str(e.value)
    assert server.url in message and f"expected {wrong}" in message and f"got {md5_of(tiny_zip)}" in message
    assert dest.read_bytes() == b"an older file" and not list(d.rglob("*.part"))
    assert snapshot(d) == before
    open_cache(d, verify="full")


def test_retry_after_cut_restarts(serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve("cut_first")
    dest = download(server.url, tmp_path / "a.zip", md5_of(tiny_zip), retries=2, progress=False, log=quiet)
    assert dest.read_bytes() == tiny_zip.read_bytes()
    half = tiny_zip.stat().st_size // 2
    assert server.ranges == [None, f"bytes={half}-"] and server.statuses == [200, 200]  # Range ignored


def test_retry_resumes_with_range(serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve("range")
    logs: list[str] = []
    dest = download(server.url, tmp_path / "a.zip", md5_of(tiny_zip), retries=2, progress=False, log=logs.append)
    assert dest.read_bytes() == tiny_zip.read_bytes()
    half = tiny_zip.stat().st_size // 2
    assert server.ranges == [None, f"bytes={half}-"] and server.statuses == [200, 206]
    assert any(f"asking to resume at byte {half}" in m for m in logs)


def test_always_cut_fails_after_retries(serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve("always_cut")
    with pytest.raises(DataError, match=r"download failed after 3 attempts \(last: connection closed after \d+ of \d+ bytes\)"):
        download(server.url, tmp_path / "a.zip", md5_of(tiny_zip), retries=2, progress=False, log=quiet)
    assert len(server.ranges) == 3 and list(tmp_path.iterdir()) == []


def test_http_error_is_not_retried(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve("404")
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url, tmp_path / "a.zip", None, retries=3, progress=False, log=quiet)
    assert len(server.ranges) == 1


def test_existing_dest_with_right_md5_is_kept(serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve()
    dest = tmp_path / "a.zip"
    shutil.copyfile(tiny_zip, dest)
    assert download(server.url, dest, md5_of(tiny_zip), progress=False, log=quiet) == dest
    assert server.ranges == []


def test_unverified_download_warns(serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve()
    logs: list[str] = []
    dest = download(server.url, tmp_path / "a.zip", None, progress=False, log=logs.append)
    assert dest.read_bytes() == tiny_zip.read_bytes()
    assert any("warning" in m and "unverified" in m for m in logs)


def test_unverified_file_is_reused_only_for_its_own_address(serve: Callable[..., Server], tiny_zip: Path,
                                                             tmp_path: Path) -> None:
    """Without an MD5, a file in downloads/ is reused only for the URL it came from: another
    address ending in the same name is downloaded into a file of its own, not answered with
    the old archive, and does not replace it (an unverified download from it may turn out to
    be a web page, and be removed)."""
    first, other = serve(), serve()
    assert first.url != other.url and first.url.rsplit("/", 1)[1] == other.url.rsplit("/", 1)[1]
    d = tmp_path / "c"
    prepare(first.url, d, counts=TINY_COUNTS, workers=1, log=quiet)
    prepare(other.url, d, counts=TINY_COUNTS, workers=1, log=quiet)
    assert len(other.ranges) == 1
    kept = {p.name for p in (d / "downloads").iterdir()}
    assert kept >= {dl.download_name(first.url), dl.download_name(other.url)} and len(kept) == 4  # each with its .url
    logs: list[str] = []
    prepare(other.url, d, counts=TINY_COUNTS, workers=1, force=True, log=logs.append)
    assert len(other.ranges) == 1  # its own file: reused, with the warning
    assert any(f"downloaded from {other.url}) unverified" in m for m in logs)
    # The same name recorded as coming from another address (a file of an older version): downloaded again.
    (d / "downloads" / dl.download_name(other.url)).with_suffix(".zip.url").write_text(first.url + "\n")
    logs.clear()
    prepare(other.url, d, counts=TINY_COUNTS, workers=1, force=True, log=logs.append)
    assert len(other.ranges) == 2 and any("not known to come from" in m for m in logs)


def test_a_verified_archive_survives_a_web_page_from_another_address(serve: Callable[..., Server], tiny_zip: Path,
                                                                     tmp_path: Path) -> None:
    good, page = serve(), serve(payload=b"<html>a login page, not a zip</html>")
    d = tmp_path / "c"
    prepare(good.url, d, counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, log=quiet)
    with pytest.raises(DataError, match="not a readable zip"):
        prepare(page.url, d, counts=TINY_COUNTS, workers=1, force=True, log=quiet)
    assert (d / "downloads" / dl.download_name(good.url)).read_bytes() == tiny_zip.read_bytes()
    prepare(good.url, d, counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, force=True, log=quiet)
    assert len(good.ranges) == 1  # not downloaded again


@pytest.mark.parametrize("url,name", [
    ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "tiny-imagenet-200.zip"),  # the official one, as it is
    ("http://h/tiny-imagenet-200.zip?X-Amz-Signature=" + "a" * 300, r"tiny-imagenet-200-[0-9a-f]{10}\.zip"),
    ("http://h/x/..", r"download-[0-9a-f]{10}\.zip"),
    ("http://h/x/.", r"download-[0-9a-f]{10}\.zip"),
    ("http://h/a%20b.zip", r"a_b-[0-9a-f]{10}\.zip"),
])
def test_download_names_are_safe_and_short(url: str, name: str) -> None:
    assert re.fullmatch(name, dl.download_name(url))
    query = ("&" if "?" in url else "?") + "another=query"
    if url != dl.OFFICIAL_URL:
        assert dl.download_name(url + query) == dl.download_name(url)  # one address, one file


def test_a_full_disk_while_downloading_is_not_retried(serve: Callable[..., Server], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve()
    real_open = open

    def full(path, mode="r", *a, **k):
        if str(path).endswith(".part"):
            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False

                def write(self, _):
                    raise OSError(28, "No space left on device")
            return Full()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as e:
        download(server.url, tmp_path / "a.zip", None, progress=False, log=quiet)
    monkeypatch.setattr("builtins.open", real_open)
    assert e.value.errno == 28 and len(server.ranges) == 1  # said at once, not retried as the network's fault


@pytest.mark.parametrize("url", ["http:///x.zip", "http://127.0.0.1:abc/x.zip", "http://127.0.0.1:99999/x.zip",
                                 "http://exa mple.com/x.zip"])
def test_an_address_without_a_host_or_port_is_one_line_at_once(url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    logs: list[str] = []
    with pytest.raises(DataError, match="not a valid address"):
        download(url, tmp_path / "x.zip", None, log=logs.append)
    assert not any("attempt failed" in m for m in logs)  # no retry: it would fail the same way


def test_unusable_unverified_download_is_not_kept(serve: Callable[..., Server], tiny_zip: Path,
                                                   tmp_path: Path) -> None:
    """An address that answers with a web page instead of the archive: the error says so, and
    the page is not kept to be reused by the next prepare (which used to fail the same way
    until the file was found and deleted by hand)."""
    server = serve(payload=b"<html>a login page, not a zip</html>")
    d = tmp_path / "c"
    for attempt in (1, 2):
        logs: list[str] = []
        with pytest.raises(DataError, match="not a readable zip"):
            prepare(server.url, d, counts=TINY_COUNTS, workers=1, log=logs.append)
        assert len(server.ranges) == attempt  # downloaded each time
        assert any("removed the unverified download" in m for m in logs)
        assert not (d / "downloads" / dl.download_name(server.url)).exists()


def test_readable_download_that_does_not_fit_the_options_is_kept(serve: Callable[..., Server], tmp_path: Path) -> None:
    """A readable archive refused for --img-size or --counts is the options' fault, not the
    archive's: it stays in downloads/, and the next prepare with the right options reads it
    without downloading again."""
    server = serve()
    d = tmp_path / "c"
    for options, error in (({"img_size": 32}, "--img-size 32: .* is TinyImageNet-200"),
                           ({"counts": (TINY_COUNTS[0], TINY_COUNTS[1] + 1, TINY_COUNTS[2])},
                            r"images, expected .*\(for a subset .*: prepare --counts any\)")):
        logs: list[str] = []
        with pytest.raises(DataError, match=error):
            prepare(server.url, d, **{"counts": TINY_COUNTS, **options}, workers=1, log=logs.append)
        assert not any("removed" in m for m in logs) and (d / "downloads" / dl.download_name(server.url)).is_file()
    prepare(server.url, d, counts=TINY_COUNTS, workers=1, log=quiet)
    assert len(server.ranges) == 1
    open_cache(d)


def test_damaged_archive_no_option_fits_is_not_kept(serve: Callable[..., Server], tiny_layout: Path,
                                                   tmp_path: Path) -> None:
    """A train image missing from one class: classes of unequal size, which no --counts
    accepts, so the archive is at fault and the unverified download is removed."""
    top = shutil.copytree(tiny_layout, tmp_path / "src" / "tiny-imagenet-200")
    next((top / "train").glob("*/images/*.JPEG")).unlink()
    server = serve(payload=make_zip(top, tmp_path / "damaged.zip").read_bytes())
    logs: list[str] = []
    with pytest.raises(DataError, match="images, expected"):
        prepare(server.url, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=logs.append)
    assert any("removed the unverified download" in m for m in logs)


def test_md5_that_cannot_be_one_is_refused_before_downloading(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve()
    with pytest.raises(DataError, match=r"^--md5 'xyz': expected an MD5 checksum, 32 hexadecimal digits$"):
        prepare(server.url, tmp_path / "c", counts=TINY_COUNTS, md5="xyz", workers=1, log=quiet)
    assert server.ranges == [] and not (tmp_path / "c").exists()


def test_a_download_is_kept_when_this_machine_fails_the_prepare(serve: Callable[..., Server], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the cache is made is not the archive's fault: the download stays
    (it was removed, and the next prepare downloaded it again)."""
    import os

    server = serve()
    d = tmp_path / "c"

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", full)
        logs: list[str] = []
        with pytest.raises(DataError, match="not enough free disk space for the cache"):
            prepare(server.url, d, counts=TINY_COUNTS, workers=1, log=logs.append)
    assert not any("removed" in m for m in logs) and (d / "downloads" / dl.download_name(server.url)).is_file()
    prepare(server.url, d, counts=TINY_COUNTS, workers=1, log=quiet)
    assert len(server.ranges) == 1  # not downloaded again
    open_cache(d)


def test_an_address_that_cannot_be_parsed_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^http://\[::1/x.zip: not a valid address \(Invalid IPv6 URL\)$"):
        download("http://[::1/x.zip", tmp_path / "x.zip", None, log=quiet)


def test_an_older_versions_download_from_the_same_address_is_renamed_not_fetched_again(
        serve: Callable[..., Server], tiny_zip: Path, tmp_path: Path) -> None:
    server = serve()
    d = tmp_path / "c"
    (d / "downloads").mkdir(parents=True)
    shutil.copyfile(tiny_zip, d / "downloads" / "tiny-imagenet-200.zip")  # the plain name, from this address
    (d / "downloads" / "tiny-imagenet-200.zip.url").write_text(server.url + "\n")
    logs: list[str] = []
    prepare(server.url, d, counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, log=logs.append)
    assert server.ranges == [] and any("renamed" in m for m in logs)
    assert sorted(p.name for p in (d / "downloads").iterdir()) == [dl.download_name(server.url),
                                                                  dl.download_name(server.url) + ".url"]
    # One that came from another address stays as it is, and this one is downloaded.
    other = serve()
    prepare(other.url, tmp_path / "c2", counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, log=quiet)
    (tmp_path / "c2" / "downloads" / dl.download_name(other.url)).rename(tmp_path / "c2" / "downloads" / "tiny-imagenet-200.zip")
    (tmp_path / "c2" / "downloads" / "tiny-imagenet-200.zip.url").write_text(other.url + "\n")
    prepare(server.url, tmp_path / "c2", counts=TINY_COUNTS, md5=md5_of(tiny_zip), workers=1, force=True, log=quiet)
    assert len(server.ranges) == 1 and (tmp_path / "c2" / "downloads" / "tiny-imagenet-200.zip").is_file()
