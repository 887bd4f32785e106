"""Atomic file writes: a temporary file in the same folder, fsync, then rename into place.

A crash at any moment leaves either the old file or the new one, never a torn one. Used for
checkpoints, metrics, the ablation's records and reports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it back would
    briefly change it for the process's other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result gets the permissions any other
        # new file would, as the run's config.json and plots do.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """Make dst the same file as src (a hard link under a temporary name, renamed into place),
    or, where the file system has no hard links, an atomic copy. Two checkpoints of the same
    state cost one write: at GPU speed an epoch lasts seconds, and the Baseline's checkpoint
    is ~460 MB. Safe because every write here replaces a file by rename, never in place: the
    next last.pth gets a new inode and leaves best.pth as it was."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems, FAT)
        with open(src, "rb") as f:
            write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), binary=False)
