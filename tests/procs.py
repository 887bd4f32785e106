"""Watching a process's children from /proc (Linux only): for tests that kill a parent
outright and check that what it started does not stay behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:  # ended meanwhile
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def spawned_children(proc: subprocess.Popen, n: int, timeout: float = 120) -> set[int]:
    """Wait until `proc` has started `n` multiprocessing (spawn) processes besides its resource
    tracker and return their pids; fewer if `proc` ended first or the time ran out."""
    found: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(found) < n and proc.poll() is None and time.monotonic() < deadline:
        found = {p for p in children(proc.pid)
                 if b"multiprocessing" in cmdline(p) and b"resource_tracker" not in cmdline(p)}
        time.sleep(0.005)
    return found


def end_within(pids: set[int], timeout: float) -> bool:
    """Whether every one of `pids` has ended within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(alive, pids))


def kill_all(pids: set[int]) -> None:
    """SIGKILL those of `pids` still running as multiprocessing children (not a pid that
    ended and was given to another process since)."""
    for pid in pids:
        if alive(pid) and b"multiprocessing" in cmdline(pid):
            try:
                os.kill(pid, 9)
            except OSError:  # ended meanwhile
                pass


def kill_leaves_no_children(args: list[str], n: int, env: dict[str, str] | None = None) -> None:
    """Run `python -m alexnet ARGS`, wait for the `n` processes it spawns, SIGKILL it (no
    chance to stop them itself), and assert they end too, within a minute."""
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    found: set[int] = set()
    try:
        found = spawned_children(proc, n)
        assert len(found) == n and proc.poll() is None, f"{args[0]} ended before its {n} process(es) were seen"
        proc.kill()
        proc.wait()
        assert end_within(found, 60), f"the processes {args[0]} started outlived it"
    finally:
        proc.kill()
        kill_all(found)  # whatever happened above: none left behind by the test either
