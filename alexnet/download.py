"""Downloading the data set archive: streamed, retried, resumed, checksummed, atomic.

The archive is streamed to `<dest>.part`. A broken transfer (connection error, timeout or
fewer bytes than Content-Length) is retried; when the server answers a Range request with
206 the transfer resumes where it stopped, otherwise it starts over. Only a complete file
whose MD5 matches is renamed onto `dest`, so `dest` never holds a partial or wrong file,
and a failed download leaves an existing `dest` exactly as it was.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import posixpath
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from alexnet.errors import DataError

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

CHUNK = 1 << 20
# Seconds to wait before retry k is k * RETRY_DELAY_S: a flaky link often needs a moment.
# Module-level so that tests can set it to 0.
RETRY_DELAY_S = 2.0
# 4xx answers will not change on a retry, except these (timeout, rate limit).
_RETRYABLE_4XX = {408, 429}


class _Incomplete(Exception):
    """The server closed the connection before sending Content-Length bytes."""


class _WriteFailed(Exception):
    """Writing the download here failed (a full disk, a read-only folder): no retry mends it."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def download_name(url: str) -> str:
    """The name a URL's download is kept under in downloads/: the file name its path ends in
    (query left out, made safe, at most 100 characters) and, for any address but the
    official one, a short hash of the address without its query. Two addresses then never
    share a file: an unverified download from one (a web page, say) would otherwise replace
    the verified archive of another, and then be removed as unusable. A signed URL whose
    query changes each time is still one address."""
    parts = urllib.parse.urlsplit(url)
    name = posixpath.basename(urllib.parse.unquote(parts.path).rstrip("/"))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-100:] or "download.zip"
    if url == OFFICIAL_URL:
        return name
    tag = hashlib.sha256(f"{parts.scheme}://{parts.netloc}{parts.path}".encode()).hexdigest()[:10]
    stem, suffix = (name[:-4], name[-4:]) if name.lower().endswith(".zip") else (name, "")
    return f"{stem}-{tag}{suffix}"


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None, retries: int = 3, progress: bool = True,
             log: Callable[[str], object] = print, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` (verified against `md5` when given) and return `dest`.

    `timeout` bounds each connect and each read, so a stalled server becomes a retry.
    """
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    origin = _origin_file(dest)
    if dest.is_file():
        if md5 is None:
            # Without a checksum only the address it came from tells the file is the one asked
            # for: another URL ending in the same name would otherwise get the old archive.
            if _read(origin) == url:
                log(f"warning: using the existing {dest} (downloaded from {url}) unverified (no MD5 to check it "
                    "against)")
                return dest
            log(f"{dest}: not known to come from {url}; downloading it again")
        elif file_md5(dest) == md5:
            log(f"{dest}: already downloaded, MD5 ok")
            return dest
        else:
            log(f"{dest}: MD5 differs from {md5}; downloading {url} again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        _fetch(url, part, retries, progress, log, timeout)
        if md5 is None:
            log(f"warning: {url}: no MD5 given, so the download is unverified")
        else:
            got = file_md5(part)
            if got != md5:
                raise DataError(f"{url}: MD5 mismatch: expected {md5}, got {got}; the download is "
                                f"corrupt or not the expected file, so it was not kept")
        origin.unlink(missing_ok=True)  # no moment where the old address names the new file
        os.replace(part, dest)
        origin.write_text(url + "\n")
    finally:
        # Our own partial file only; after a successful os.replace it no longer exists.
        part.unlink(missing_ok=True)
    log(f"downloaded {url} to {dest}")
    return dest


def _origin_file(dest: Path) -> Path:
    """Where the address `dest` was downloaded from is recorded."""
    return dest.with_name(dest.name + ".url")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def forget(dest: Path) -> None:
    """Remove a downloaded file and its recorded address (a download that proved unusable)."""
    Path(dest).unlink(missing_ok=True)
    _origin_file(Path(dest)).unlink(missing_ok=True)


def _fetch(url: str, part: Path, retries: int, progress: bool, log: Callable[[str], object],
           timeout: float) -> None:
    # A .part left by an earlier, interrupted run may belong to another URL: start clean and
    # resume only bytes fetched during this call.
    part.unlink(missing_ok=True)
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port checks the range: the socket layer would try 99999 as another port
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        raise DataError(f"{url}: not a valid address ({e})") from None
    if not host:  # http:///x.zip: no retry will find a host
        raise DataError(f"{url}: not a valid address (no host)")
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            have = part.stat().st_size if part.exists() else 0
            log(f"{url}: attempt failed ({error}); retry {attempt} of {retries}"
                + (f", asking to resume at byte {have} (from the start if the server cannot)" if have else ""))
            time.sleep(RETRY_DELAY_S * attempt)
        try:
            _attempt(url, part, progress, timeout)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our Range is not satisfiable: the next attempt starts over
                part.unlink(missing_ok=True)
            elif 400 <= e.code < 500 and e.code not in _RETRYABLE_4XX:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the address") from None
            error = f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:
            error = f"{e.reason}"
        except _Incomplete as e:
            error = str(e)
        except _WriteFailed as e:
            if e.error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise e.error from None  # said as a full or read-only disk, whatever the command
            raise DataError(f"{part}: cannot write the download ({e.error.strerror or e.error})") from None
        except http.client.InvalidURL as e:
            raise DataError(f"{url}: not a valid address ({e})") from None
        except (http.client.HTTPException, OSError) as e:
            error = f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
        except ValueError as e:  # urllib's word for an address it cannot parse ("Invalid IPv6 URL")
            raise DataError(f"{url}: not a valid address ({e})") from None
    raise DataError(f"{url}: download failed after {retries + 1} attempts (last: {error}); "
                    f"check the network, or fetch the file another way and make the cache from it "
                    f"(`alexnet prepare --source FILE`, or $ALEXNET_SOURCE=FILE for train and evaluate)")


def _attempt(url: str, part: Path, progress: bool, timeout: float) -> None:
    """One request; appends to `part` on a 206 answer, otherwise rewrites it."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "alexnet-tinyimagenet"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        if not (have and resp.status == 206 and _range_start(resp.headers.get("Content-Range")) == have):
            have = 0  # the server ignored the Range (or this is the first request): start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=Path(part.stem).name, disable=not (progress and sys.stderr.isatty()))
        with bar, _writing(part, "ab" if have else "wb") as f:
            while chunk := resp.read(CHUNK):
                try:
                    f.write(chunk)
                except OSError as e:
                    raise _WriteFailed(e) from None
                have += len(chunk)
                bar.update(len(chunk))
    if total is not None and have < total:
        raise _Incomplete(f"connection closed after {have} of {total} bytes")


def _writing(part: Path, mode: str):
    """`part` opened for the download; a failure to open it is this machine's, not the network's."""
    try:
        return open(part, mode)
    except OSError as e:
        raise _WriteFailed(e) from None


def _range_start(content_range: str | None) -> int | None:
    m = re.match(r"bytes\s+(\d+)-", content_range or "")
    return int(m.group(1)) if m else None
