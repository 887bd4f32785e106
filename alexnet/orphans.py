"""Worker processes that end with the process that started them.

`prepare`'s decoding workers and `bench`'s per-row process are started with multiprocessing's
spawn. If their parent is killed outright (SIGKILL, the out-of-memory killer, a job
scheduler's hard limit) nothing tells them: a decoding worker blocks for ever on a queue
whose writing end it holds itself, and a bench row runs its minutes of training to the end,
holding memory and both cores. On Linux the kernel can send a signal when the parent dies
(prctl PR_SET_PDEATHSIG); elsewhere, or where prctl is not reachable, the check at start
below is all there is (a parent killed later leaves its children behind there). PyTorch's
DataLoader workers watch their parent themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int) -> None:
    """Call first thing in a child process; `parent` is the pid of the process that started
    it (os.getpid() there). On Linux the kernel kills the child when that process ends;
    anywhere, a child whose parent already ended before this ran exits at once."""
    if sys.platform.startswith("linux"):
        # SIGKILL, not SIGTERM: a SIGTERM ignored where the job started (nohup-like wrappers)
        # stays ignored in spawned children; Python's SIGTERM would do no clean-up anyway.
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (musl without it, a sandbox): the check only
            pass
    # The parent may have died between starting this process and the prctl above: then no
    # signal comes, and this process has been handed to init (or a subreaper).
    if os.getppid() != parent:
        os._exit(1)
