"""Atomic file writes: a temporary file in the same folder, fsync, then rename into place.

A crash at any moment leaves either the old file or the new one, never a torn one. Used for
checkpoints, metrics, the ablation's records and reports. And the lock that keeps one run's
folder to one process at a time, so that two runs cannot replace each other's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def not_a_folder(folder: Path) -> str | None:
    """Why `folder` cannot be made or used as a folder, where a file stands in its place or
    above it ("is a file, not a folder", "<that file> is a file, not a folder"); None if not."""
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is None or above.is_dir():
        return None
    return "is a file, not a folder" if above == folder else f"{above} is a file, not a folder"


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


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths name one file or folder (through links too); False where either is
    missing or unreadable, whose own error comes when it is read."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


# -- one run per folder ------------------------------------------------------------------

_HELD: dict[str, int] = {}  # folder -> the descriptor its lock lives on


def lock_folder(path: str | Path) -> bool:
    """Take an exclusive lock on a folder for this process (flock on the folder itself: no
    lock file to leave behind, and the kernel drops it when the process dies, SIGKILL
    included). False when another process holds it; True where the file system has no
    locks (then nothing is checked)."""
    key = str(Path(path).resolve())
    if key in _HELD:
        return True
    try:
        import fcntl
    except ImportError:  # not POSIX
        return True
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # no locks on this file system (some network ones)
        os.close(fd)
        return True
    _HELD[key] = fd
    return True


def unlock_folder(path: str | Path) -> None:
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the lock


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files a killed writer left (`.NAME.XXXX.tmp`, `.NAME.PID.link`): a
    checkpoint's is as large as the checkpoint. Only safe while this process holds the
    folder's lock, so that no other writer is mid-write."""
    stale = [p for p in Path(folder).glob(".*") if p.is_file() and p.suffix in (".tmp", ".link")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
