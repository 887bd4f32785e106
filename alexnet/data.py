"""TinyImageNet-200 (or any image folder) -> a validated uint8 cache that is memory-mapped.

`prepare` reads a source once (a URL, the official zip, an extracted folder or an image
folder), checks it against the expected layout and counts (reading and decoding a source
is `alexnet.sources`), decodes every image in worker processes straight into .npy memmaps,
and records checksums and colour statistics in `manifest.json`. `open_cache` maps the
arrays without copying and checks they are the files the manifest describes. Every problem
is a one-line `DataError` naming the file.

Cache files in data_dir: train_x.npy (N, H, W, 3) uint8 RGB, train_y.npy (N,) int64,
val_x.npy, val_y.npy, classes.json and manifest.json. Everything is written under a
temporary name and moved into place; the manifest comes last, so a directory without one
holds no cache, and a failed rebuild leaves the previous cache as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from alexnet.download import OFFICIAL_MD5, OFFICIAL_URL, download, download_name, file_md5, forget
from alexnet.errors import DataError
from alexnet.orphans import exit_with_parent
from alexnet.sources import (TINY_SIZE, Log, SettingsMismatch, _decode, _open_source, _Plan, _plan_folder, _plan_tiny,
                             _Reader, _unreadable_folder, printable, walk)

FORMAT_VERSION = 1
DEFAULT_DATA_DIR = "data"
DEFAULT_COUNTS = (200, 500, 50)
ARRAYS = ("train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy")
FILES = ARRAYS + ("classes.json",)
# Timed on the real 1.23 GB train_x.npy (page cache, 2-core VM): crc32 0.55 s, sha1 0.86 s,
# sha256 0.94 s (SHA-NI), blake2b 1.6 s. sha256: within 10% of sha1 and a real hash, where
# crc32's 32 bits are too weak to vouch for a 1.4 GB cache.
HASH = "sha256"
TASK_IMAGES = 1000  # images per worker task: small enough to balance two workers
# Mean, std and the PCA lighting use a fixed strided subset of about this many train images
# (all their pixels): 41M pixels estimate them to ~1e-3, at a tenth of the cost of all.
STATS_IMAGES = 10_000


@dataclass
class Split:
    x: np.ndarray  # (N, H, W, 3) uint8, RGB
    y: np.ndarray  # (N,) int64 class indices


@dataclass
class Cache:
    root: Path
    train: Split
    val: Split
    wnids: list[str]
    names: list[str]
    img_size: int
    stats: dict  # mean, std (RGB, 0..1), eigval (3,), eigvec (3x3, columns = eigenvectors)
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def default_data_dir() -> Path:
    return Path(os.environ.get("ALEXNET_DATA") or DEFAULT_DATA_DIR)


def default_source() -> str:
    return os.environ.get("ALEXNET_SOURCE") or OFFICIAL_URL


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


# -- prepare ---------------------------------------------------------------------------

def prepare(source: str | Path | None, data_dir: Path,
            counts: tuple[int, int, int] | None = DEFAULT_COUNTS, img_size: int = 64,
            md5: str | None = None, workers: int = 2, force: bool = False, log: Log = print) -> Path:
    """Build the cache in `data_dir` from `source` (skipped when a valid one exists)."""
    data_dir = Path(data_dir)
    source = default_source() if source is None else source
    url = str(source) if _is_url(source) else None
    if url == OFFICIAL_URL and md5 is None:
        md5 = OFFICIAL_MD5
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise DataError(f"--md5 {md5!r}: expected an MD5 checksum, 32 hexadecimal digits")
    if md5 is not None and url is None and Path(source).is_dir():
        raise DataError(f"--md5: {source} is a folder, and an MD5 checks one file (a download, or a local .zip); "
                        "leave --md5 out for a folder")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"--img-size must be a positive number of pixels, got {img_size!r}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0 (decoding processes; 0 or 1 decodes in this process), got {workers}")
    if url == OFFICIAL_URL:  # before a download that could only end in this error
        _check_tiny_size(img_size, url)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: is a file, not a cache directory")
    if url is None and not Path(source).exists():  # before the cache folder is made: a typo leaves nothing behind
        raise _missing_source(Path(source))
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the cache directory ({e.strerror})") from None
    try:
        return _prepare_locked(source, url, md5, data_dir, counts, img_size, workers, force, log)
    except BaseException:
        if created:  # a later --data then names a missing folder, not an empty one to download into
            _remove_if_empty(data_dir)
        raise


class MachineFailure(DataError):
    """A prepare that this machine could not finish (a full disk, a decoding worker killed):
    the data set is not at fault, so a download of it is kept."""


def _remove_if_empty(data_dir: Path) -> None:
    """Remove a cache folder that holds nothing but the prepare's lock (and an empty downloads/),
    unless another prepare holds that lock now (it waited for this one, and goes on there)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock was taken (and Windows cannot remove an open file)
        fcntl = None
    try:
        with open(data_dir / ".prepare.lock", "a") if fcntl is not None else contextlib.nullcontext() as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            downloads = data_dir / "downloads"
            if downloads.is_dir() and not any(downloads.iterdir()):
                downloads.rmdir()
            if {p.name for p in data_dir.iterdir()} <= {".prepare.lock"}:
                (data_dir / ".prepare.lock").unlink(missing_ok=True)
                data_dir.rmdir()
    except OSError:  # another process is preparing there now (BlockingIOError), or it went away: leave it
        pass


def _prepare_locked(source, url: str | None, md5: str | None, data_dir: Path, counts, img_size: int,
                    workers: int, force: bool, log: Log) -> Path:
    writable = os.access(data_dir, os.W_OK)  # else a cache someone else made: usable, but its lock cannot be taken
    with _lock(data_dir, log) if writable else contextlib.nullcontext():
        if writable:
            _remove_leftovers(data_dir)
        fingerprint = {"url": url, "md5": md5} if url else _fingerprint(Path(source), skip=data_dir)
        stale = "forced rebuild" if force else _stale_reason(data_dir, fingerprint, counts, img_size)
        if stale is None:
            log(f"cache up to date: {data_dir}")
            return data_dir
        if not writable:
            raise DataError(f"{data_dir}: not writable here, and the cache needs building ({stale})")
        log(f"preparing the cache in {data_dir} from {source} ({stale})")
        if url:
            dest = data_dir / "downloads" / download_name(url)
            _adopt_older_download(url, dest, log)
            path = download(url, dest, md5, log=log)
        else:
            path = Path(source)
            if md5 and path.is_file() and (got := file_md5(path)) != md5.lower():
                raise DataError(f"{path}: MD5 mismatch: expected {md5.lower()}, got {got}")
        try:
            _build(path, str(source), fingerprint, data_dir, counts, img_size, workers, log)
        except DataError as e:
            # Unverified and unreadable as it is: the next prepare downloads again. A readable
            # archive that does not fit --counts or --img-size, or one whose decoding this
            # machine could not finish (a full disk, a worker killed), stays for the next try.
            if url and not md5 and not isinstance(e, (SettingsMismatch, MachineFailure)):
                forget(path)
                log(f"removed the unverified download {path}: the next prepare downloads {url} again")
            raise
    return data_dir


def _adopt_older_download(url: str, dest: Path, log: Log) -> None:
    """An archive an older version kept under the address's plain file name, with the record
    that it came from this very address: renamed to the name this address has now, instead of
    downloaded again beside it (a quarter of a gigabyte, left behind for ever)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or name == dest.name:
        return
    old = dest.with_name(name)
    origin = old.with_name(old.name + ".url")
    try:  # (a name too long for the file system: there is no such file)
        if dest.exists() or not old.is_file() or origin.read_text().strip() != url:
            return
        os.replace(old, dest)
        os.replace(origin, dest.with_name(dest.name + ".url"))
    except OSError:
        return
    log(f"{old}: renamed {dest.name}, the name a download from {url} now has")


def _remove_leftovers(data_dir: Path) -> None:
    """What a prepare killed outright (SIGKILL, a scheduler's hard limit, the out-of-memory
    killer) left: the arrays it was decoding into (their blocks reserved: the whole cache's
    size again) and partial downloads. Only a prepare holding the lock writes them, and this
    one holds it now."""
    for name in FILES:
        (data_dir / f"{name}.tmp").unlink(missing_ok=True)
    downloads = data_dir / "downloads"
    if downloads.is_dir():
        for part in downloads.glob("*.part"):
            part.unlink(missing_ok=True)


def _check_tiny_size(img_size: int, source: str) -> None:
    """TinyImageNet-200 is cached as it is: its images are checked to be 64x64, not resized."""
    if img_size != TINY_SIZE:
        raise SettingsMismatch(f"--img-size {img_size}: {source} is TinyImageNet-200, whose images are all "
                        f"{TINY_SIZE}x{TINY_SIZE} and are cached as they are; --img-size resizes only image "
                        f"folders (root/train/<class>/*, root/val/<class>/*), so leave it at {TINY_SIZE} here "
                        f"(training upsamples on the device: alexnet train --img-size)")


def _fingerprint(path: Path, skip: Path | None = None) -> dict:
    """Cheap identity of a local source: stat of a file, or totals over a folder's files.
    Caches are left out, `skip` (this one's folder) and any other in the source: a cache built
    inside its own source folder would otherwise change the source's totals with every build,
    and be rebuilt at every start (two such caches, each at every start of the other)."""
    try:
        if path.is_file():
            st = path.stat()
            return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if path.is_dir():
            n = size = mtime = 0
            # Each file's name, size and time too: moving an image to another class folder (the
            # way to relabel an image folder) keeps the count, the total size and the newest time.
            listing = hashlib.sha256()
            entries = []
            skip_st = skip.stat() if skip is not None and skip.exists() else None
            for dirpath, dirs, files in walk(path, onerror=_unreadable_folder(path)):
                dirs[:] = [d for d in dirs if not _is_cache(os.path.join(dirpath, d), skip_st)]
                if dirpath == str(path) and _is_cache(dirpath, skip_st):
                    # a cache in the source's own folder: its files, its lock, its temporaries
                    dirs[:] = [d for d in dirs if d != "downloads"]
                    files = [f for f in files if f not in (*FILES, "manifest.json") and not f.startswith(".")]
                for f in files:
                    st = os.stat(os.path.join(dirpath, f))
                    n, size, mtime = n + 1, size + st.st_size, max(mtime, st.st_mtime_ns)
                    entries.append(f"{os.path.relpath(os.path.join(dirpath, f), path)}\0{st.st_size}\0{st.st_mtime_ns}")
            for entry in sorted(entries):  # the walk's order is the file system's
                listing.update(os.fsencode(entry) + b"\n")
            return {"path": str(path.resolve()), "files": n, "size": size, "mtime_ns": mtime,
                    "listing": listing.hexdigest()}
    except OSError as e:  # the file it is about: a broken link in the folder, say
        raise DataError(printable(f"{e.filename or path}: cannot read it ({e.strerror})")) from None
    raise _missing_source(path)


def _is_cache(folder: str, skip_st: os.stat_result | None) -> bool:
    """Whether a folder met while fingerprinting a source is a cache: this prepare's own, or
    another one built there (its manifest and arrays)."""
    if skip_st is not None and os.path.samestat(os.stat(folder), skip_st):
        return True
    return os.path.isfile(os.path.join(folder, "manifest.json")) and os.path.isfile(os.path.join(folder, ARRAYS[0]))


def _missing_source(path: Path) -> DataError:
    return DataError(f"{path}: no such file or folder; expected tiny-imagenet-200.zip, its "
                     f"extracted folder, an image folder (train/<class>/*) or an http(s) URL")


def _stale_reason(data_dir: Path, fingerprint: dict, counts: tuple[int, int, int] | None,
                  img_size: int) -> str | None:
    """Why the cache in data_dir must be (re)built, or None when it is up to date."""
    try:
        manifest = _read_manifest(data_dir)
        _check_files(data_dir, manifest, "fast")
    except DataError:
        return "no valid cache there yet" if not (data_dir / "manifest.json").exists() else "cache invalid"
    saved = manifest["source"]["fingerprint"]
    if saved != fingerprint:
        if (isinstance(saved, dict) and "listing" in fingerprint and "listing" not in saved
                and {**saved, "listing": fingerprint["listing"]} == fingerprint):
            return "the cache was made by an older version, which did not record its source's file names"
        return "the source differs from the one the cache was built from"
    if manifest["img_size"] != img_size:
        return f"img_size {img_size} differs from the cache's {manifest['img_size']}"
    c = manifest["counts"]
    if (counts is not None and manifest["source"]["layout"] == "tinyimagenet"
            and [c["classes"], c["train_per_class"], c["val_per_class"]] != list(counts)):
        return f"counts {tuple(counts)} differ from the cache's"
    return None


@contextmanager
def _lock(data_dir: Path, log: Log = lambda *a: None) -> Iterator[None]:
    """Serialise prepares of one directory (e.g. several training processes starting at once);
    a prepare that has to wait says so (a download and decode can take minutes)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    lock, said = data_dir / ".prepare.lock", False
    while True:
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log(f"waiting for another process preparing the cache in {data_dir} to finish")
                    said = True
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                # The process we waited for may have failed and removed the folder it made, lock
                # file and all (_remove_if_empty): this lock is then on a file no one else sees.
                held = os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
            except FileNotFoundError:
                held = False
            if not held:
                fcntl.flock(f, fcntl.LOCK_UN)
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return


def _build(path: Path, description: str, fingerprint: dict, data_dir: Path,
           counts: tuple[int, int, int] | None, img_size: int, workers: int, log: Log) -> None:
    t0 = time.perf_counter()
    reader, layout = _open_source(path)
    tmp = {name: data_dir / f"{name}.tmp" for name in FILES}
    try:
        if layout == "tinyimagenet":
            _check_tiny_size(img_size, description)
        plan = _plan_tiny(reader, counts, log) if layout == "tinyimagenet" else _plan_folder(reader, log)
        shapes = {"train": len(plan.train), "val": len(plan.val)}
        for split, n in shapes.items():
            _allocate(tmp[f"{split}_x.npy"], (n, img_size, img_size, 3), data_dir)
        s1, s2, pixels = _decode_all(reader, plan, tmp, img_size, layout == "tinyimagenet", workers, log)
        for split, y in (("train", plan.train_y), ("val", plan.val_y)):
            with open(tmp[f"{split}_y.npy"], "wb") as f:
                np.save(f, np.asarray(y, dtype=np.int64))
        _write_json(tmp["classes.json"], {"wnids": plan.wnids, "names": plan.names})
        digests = _hash_files([tmp[name] for name in FILES])
        # From here on the old cache is gone: without a manifest the directory holds no cache.
        (data_dir / "manifest.json").unlink(missing_ok=True)
        files = {}
        for name in FILES:
            os.replace(tmp[name], data_dir / name)
            st = (data_dir / name).stat()
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, HASH: digests[tmp[name]]}
    finally:
        reader.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
    train_count = np.bincount(plan.train_y, minlength=len(plan.wnids))
    val_count = np.bincount(plan.val_y, minlength=len(plan.wnids))
    uniform = lambda c: int(c[0]) if c.min() == c.max() else [int(k) for k in c]  # noqa: E731
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"description": description, "path": str(path), "layout": layout,
                   "fingerprint": fingerprint},
        "counts": {"classes": len(plan.wnids), "train": shapes["train"], "val": shapes["val"],
                   "train_per_class": uniform(train_count), "val_per_class": uniform(val_count)},
        "img_size": img_size,
        "order": plan.order,
        "hash": HASH,
        "files": files,
        "stats": _stats(s1, s2, pixels, shapes["train"]),
    }
    _write_json(data_dir / "manifest.json", manifest)
    log(f"cache ready in {data_dir}: {shapes['train']} train and {shapes['val']} val images, "
        f"{len(plan.wnids)} classes, {img_size}x{img_size} ({time.perf_counter() - t0:.1f} s)")


def _allocate(path: Path, shape: tuple[int, ...], data_dir: Path) -> None:
    """Create the .npy with its blocks reserved: a full disk is an error now, not a crash
    (SIGBUS) of a worker writing into a sparse memmap later."""
    array = open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # writes the .npy header
    del array
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except AttributeError:  # no posix_fallocate on this platform
        pass
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise MachineFailure(f"{data_dir}: not enough free disk space for the cache") from None


# -- decoding in worker processes ------------------------------------------------------

_WORKER: dict = {}  # per-process state: the opened source, the output memmaps, options


def _init_worker(spec: tuple[str, str, str], outputs: dict[str, str], img_size: int,
                 strict: bool, stride: int, parent: int | None = None) -> None:
    if parent is not None:  # a worker process, not prepare's own with workers=1
        exit_with_parent(parent)
    _WORKER.update(reader=_Reader(*spec), size=img_size, strict=strict, stride=stride,
                   out={split: np.load(p, mmap_mode="r+") for split, p in outputs.items()})


def _decode_task(split: str, start: int, names: list[str]) -> tuple[int, np.ndarray, np.ndarray, int, str | None]:
    """Decode names into out[split][start:]; returns (count, sum, sum of outer products,
    pixels, error) where the sums run over this task's train images in the stats subset."""
    w = _WORKER
    out, reader = w["out"][split], w["reader"]
    for i, name in enumerate(names):
        image, error = _decode(reader, name, w["size"], w["strict"])
        if error:
            return i, np.zeros(3), np.zeros((3, 3)), 0, error
        out[start + i] = image
    s1, s2, pixels = np.zeros(3), np.zeros((3, 3)), 0
    if split == "train":
        # Float64 sums of uint8 values and their products are exact integers (< 2**53), so
        # the statistics do not depend on how the images are split among workers.
        picked = [i for i in range(start, start + len(names)) if i % w["stride"] == 0]
        for k in range(0, len(picked), 16):
            x = np.asarray(out[picked[k:k + 16]], dtype=np.float64).reshape(-1, 3)
            s1 += x.sum(0)
            s2 += np.einsum("ni,nj->ij", x, x)
            pixels += len(x)
    return len(names), s1, s2, pixels, None


def _decode_all(reader: _Reader, plan: _Plan, tmp: dict[str, Path], img_size: int, strict: bool,
                workers: int, log: Log) -> tuple[np.ndarray, np.ndarray, int]:
    tasks = [(split, start, names[start:start + TASK_IMAGES])
             for split, names in (("train", plan.train), ("val", plan.val))
             for start in range(0, len(names), TASK_IMAGES)]
    stride = max(1, len(plan.train) // STATS_IMAGES)
    init = (reader.spec(), {s: str(tmp[f"{s}_x.npy"]) for s in ("train", "val")}, img_size, strict, stride)
    total = len(plan.train) + len(plan.val)
    workers = max(1, min(workers, len(tasks)))
    log(f"decoding {total} images with {workers} worker{'s' if workers > 1 else ''}")
    s1, s2, pixels = np.zeros(3), np.zeros((3, 3)), 0
    with tqdm(total=total, unit="img", desc="decoding", disable=None) as bar:
        def collect(result: tuple) -> None:
            nonlocal s1, s2, pixels
            n, a, b, p, error = result
            if error:
                raise DataError(error)
            s1, s2, pixels = s1 + a, s2 + b, pixels + p
            bar.update(n)

        if workers == 1:
            _init_worker(*init)
            try:
                for task in tasks:
                    collect(_decode_task(*task))
            finally:
                _WORKER["reader"].close()
                _WORKER.clear()
            return s1, s2, pixels
        # spawn: safe whatever threads (torch, CUDA) the parent already runs.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(*init, os.getpid())) as pool:
            futures = [pool.submit(_decode_task, *task) for task in tasks]
            try:
                for future in as_completed(futures):
                    collect(future.result())
            except BrokenProcessPool:
                raise MachineFailure(f"{reader.path}: a decoding worker died (out of memory?); "
                                f"try prepare with fewer workers") from None
            finally:
                for future in futures:
                    future.cancel()
    return s1, s2, pixels


def _stats(s1: np.ndarray, s2: np.ndarray, pixels: int, images: int) -> dict:
    """Mean, std and the PCA of the RGB covariance (0..1 scale) from the exact sums."""
    mean = s1 / pixels
    cov = s2 / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov / 255.0**2)
    eigval, eigvec = eigval[::-1].clip(min=0), eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec.sum(0) < 0, -1.0, 1.0)  # a fixed sign per eigenvector
    return {"mean": (mean / 255).tolist(), "std": (np.sqrt(np.diag(cov).clip(min=0)) / 255).tolist(),
            "eigval": eigval.tolist(), "eigvec": eigvec.tolist(),
            "subset": f"all pixels of the train images whose index is a multiple of "
                      f"{max(1, images // STATS_IMAGES)} ({pixels} pixels)"}


# -- files, checksums, manifest --------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique: several readers may rewrite it
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk: no empty temporary left beside the manifest
        tmp.unlink(missing_ok=True)
        raise


def _hash_file(path: Path, algorithm: str = HASH) -> str:
    h = hashlib.new(algorithm)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_files(paths: list[Path], algorithm: str = HASH) -> dict[Path, str]:
    # hashlib releases the GIL on large updates: threads hash the files in parallel.
    with ThreadPoolExecutor(min(4, len(paths))) as pool:
        return dict(zip(paths, pool.map(lambda p: _hash_file(p, algorithm), paths)))


def _rebuild_hint(data_dir: Path, manifest: dict | None = None) -> str:
    """The command that rebuilds this cache from the source it was built from (recorded in
    its manifest): without --source, prepare would download the official archive instead."""
    cmd = ["alexnet prepare"]
    try:
        fp = manifest["source"]["fingerprint"]
        where = fp.get("url") or fp.get("path")
        if where and where != OFFICIAL_URL:
            cmd.append(f"--source {shlex.quote(str(where))}")
            if fp.get("url") and fp.get("md5"):
                cmd.append(f"--md5 {fp['md5']}")
        if manifest["img_size"] != TINY_SIZE:
            cmd.append(f"--img-size {int(manifest['img_size'])}")
        c = manifest["counts"]
        counts = (c["classes"], c["train_per_class"], c["val_per_class"])
        if manifest["source"]["layout"] == "tinyimagenet" and counts != DEFAULT_COUNTS:
            # per-class counts that differ between classes (a list) came from --counts any
            uneven = any(isinstance(k, list) for k in counts)
            cmd.append("--counts " + ("any" if uneven else ",".join(str(int(k)) for k in counts)))
    except (TypeError, KeyError, AttributeError, ValueError):  # no manifest, or not one of ours
        pass
    return f"run `{' '.join(cmd)} --data {shlex.quote(str(data_dir))} --force`"


def _read_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{data_dir}: no prepared data cache here (no manifest.json); "
                        f"run `alexnet prepare --data {data_dir}` first")
    manifest = None
    try:
        manifest = json.loads(path.read_text())
        algorithm = manifest["hash"]
        ok = (manifest["format_version"] == FORMAT_VERSION and algorithm in hashlib.algorithms_available
              and set(manifest["files"]) == set(FILES)
              and all({"size", "mtime_ns", algorithm} <= set(r) for r in manifest["files"].values())
              and {"source", "counts", "img_size", "stats"} <= set(manifest))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path}: unreadable or from another version of this program; "
                        f"{_rebuild_hint(data_dir, manifest if isinstance(manifest, dict) else None)}")
    return manifest


def _check_files(data_dir: Path, manifest: dict, verify: str) -> None:
    rebuild = _rebuild_hint(data_dir, manifest)
    changed, to_hash = False, []
    for name, rec in manifest["files"].items():
        path = data_dir / name
        try:
            st = path.stat()
        except OSError:
            raise DataError(f"{path}: missing, though manifest.json lists it; {rebuild}") from None
        if st.st_size != rec["size"]:
            raise DataError(f"{path}: {st.st_size} bytes, manifest.json says {rec['size']} "
                            f"(cache changed or truncated); {rebuild}")
        if verify == "full" or st.st_mtime_ns != rec["mtime_ns"]:
            to_hash.append((path, rec, st.st_mtime_ns))
    algorithm = manifest["hash"]  # the cache's own choice, should HASH change later
    digests = _hash_files([p for p, _, _ in to_hash], algorithm) if to_hash else {}
    for path, rec, mtime_ns in to_hash:
        if digests[path] != rec[algorithm]:
            raise DataError(f"{path}: checksum does not match manifest.json (cache changed or "
                            f"corrupted); {rebuild}")
        if rec["mtime_ns"] != mtime_ns:  # same bytes, new times: a copied cache
            rec["mtime_ns"], changed = mtime_ns, True
    if changed:
        try:
            _write_json(data_dir / "manifest.json", manifest)
        except OSError:  # a read-only copy: it stays valid, only checked by checksum each time
            pass


# -- open ------------------------------------------------------------------------------

def open_cache(data_dir: Path, verify: str = "fast") -> Cache:
    """Map a prepared cache. verify: "fast" (size and mtime; checksum only for files whose
    mtime changed) or "full" (always checksum)."""
    if verify not in ("fast", "full"):
        raise ValueError(f"verify must be 'fast' or 'full', got {verify!r}")
    data_dir = Path(data_dir)
    manifest = _read_manifest(data_dir)
    _check_files(data_dir, manifest, verify)
    rebuild = _rebuild_hint(data_dir, manifest)
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(data_dir / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{data_dir / name}: not a readable .npy array ({e}); {rebuild}") from None
    try:
        classes = json.loads((data_dir / "classes.json").read_text())
        wnids, names = list(classes["wnids"]), list(classes["names"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{data_dir / 'classes.json'}: unreadable; {rebuild}") from None
    s, c = manifest["img_size"], manifest["counts"]
    for split in ("train", "val"):
        x, y = arrays[f"{split}_x.npy"], arrays[f"{split}_y.npy"]
        if (x.shape != (c[split], s, s, 3) or x.dtype != np.uint8 or y.shape != (c[split],)
                or y.dtype != np.int64 or len(wnids) != c["classes"]):
            raise DataError(f"{data_dir / (split + '_x.npy')}: shape {x.shape} or labels do not "
                            f"match manifest.json; {rebuild}")
        # A label out of range (a file edited in place, its time kept: not re-hashed) would
        # fail deep inside the loss, or index past a table; 100,000 labels read in a millisecond.
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(wnids)):
            raise DataError(f"{data_dir / (split + '_y.npy')}: labels from {int(y.min())} to {int(y.max())}, "
                            f"expected 0 to {len(wnids) - 1} ({len(wnids)} classes); {rebuild}")
    return Cache(root=data_dir, train=Split(arrays["train_x.npy"], arrays["train_y.npy"]),
                 val=Split(arrays["val_x.npy"], arrays["val_y.npy"]), wnids=wnids, names=names,
                 img_size=s, stats=manifest["stats"], manifest=manifest)


def ensure_cache(data_dir: Path | None, log: Log = print,
                 counts: tuple[int, int, int] | None = DEFAULT_COUNTS) -> Cache:
    """Open the cache in data_dir (default: $ALEXNET_DATA or ./data), preparing it first
    from $ALEXNET_SOURCE (default: the official URL) when there is none."""
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        source = default_source()
        log(f"no cache in {data_dir}: preparing it from {source} first")
        prepare(source, data_dir, counts=counts, log=log)
    return open_cache(data_dir)


def _source_in(folder: Path, looks: list[str]) -> Path:
    """What `prepare --source` takes of a folder's data-set-like entries: the folder when the
    layout starts there, else the folder one down that holds wnids.txt, else the zip (prepare
    reads a zip, not a folder that holds one)."""
    if any("/" not in p and not p.endswith(".zip") for p in looks):
        return folder
    below = [p for p in looks if p.endswith("/wnids.txt")]
    return folder / (Path(below[0]).parent if below else looks[0])


def cache_for(data: str | Path | None, log: Log = print) -> Cache:
    """The cache a command's --data names: ensure_cache, except that a --data given that does
    not exist is an error instead of a place to download into (a mistyped path would otherwise
    start downloading the whole data set there)."""
    env = os.environ.get("ALEXNET_DATA")
    default = f"$ALEXNET_DATA ({env})" if env else str(DEFAULT_DATA_DIR)
    if data and not Path(data).exists():
        raise DataError(f"--data {data}: directory does not exist; create the cache with "
                        f"`alexnet prepare --data {data}` or leave --data out to use {default}")
    folder = Path(data) if data else default_data_dir()
    if folder.exists() and not folder.is_dir():
        name = f"--data {data}" if data else default
        raise DataError(f"{name}: is a file, not a cache directory; a data set's zip or folder is made into a cache "
                        f"with `alexnet prepare --source {folder} --data DIR`, then --data DIR")
    if folder.is_dir() and not (folder / "manifest.json").is_file():
        # The extracted data set (or a folder holding it, or its zip) is an easy --data to give,
        # or ./data to fill, by mistake; preparing there would download the archive beside it.
        # Anything else (an empty folder, lost+found, what a prepare in progress writes) is a
        # place to prepare.
        looks = sorted(str(p.relative_to(folder)) for p in [*folder.iterdir(), *folder.glob("*/wnids.txt")]
                       if p.name in ("wnids.txt", "train", "val", "test") or p.suffix == ".zip")
        if looks:
            name = f"--data {data}" if data else f"{default} (the default --data)"
            raise DataError(f"{name}: holds no cache (no manifest.json) but what looks like a data set "
                            f"({', '.join(looks[:3])}{', ...' if len(looks) > 3 else ''}); make a cache from it with "
                            f"`alexnet prepare --source {_source_in(folder, looks)} --data DIR`, then give --data DIR")
    return ensure_cache(Path(data) if data else None, log=log)
