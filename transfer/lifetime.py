"""Process lifetime: a child that must not outlive the process that started it (a bus server, a role,
a reward sandbox, a launched inference server)."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (even by SIGKILL).

    ``parent``: the pid the caller expects as its parent; if it is already gone (it died before the
    signal was armed), ``sig`` is raised at once. Returns False where the kernel offers no such thing
    (not Linux, or no glibc): then only the parent's own shutdown stops this process.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
