"""Process lifetime: a child that must not outlive the process that started it (a bus server, a role,
a reward sandbox, a launched inference server)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

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


def die_with(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process when process ``pid`` (not necessarily its parent) is gone.

    For a process forked by a helper (a forkserver) rather than by the one it must not outlive. A daemon
    thread waits on a pidfd (Linux 5.3+), or else looks every ``DIE_WITH_POLL_S``; if ``pid`` is gone
    already, ``sig`` is raised at once. Block ``sig`` in the calling thread first if it must reach a
    thread that waits for it: the new thread inherits the caller's signal mask.
    """
    import threading

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), sig)
        return
    except (AttributeError, OSError):  # no pidfds here: poll
        fd = None

    def wait() -> None:
        if fd is not None:
            import select

            select.select([fd], [], [])  # readable once the process has exited
        else:
            while alive(pid):
                time.sleep(DIE_WITH_POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait, name=f"rlflow-die-with-{pid}", daemon=True).start()


DIE_WITH_POLL_S = 1.0  # without pidfds: how late, at most, ``die_with`` notices


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_EXIT_HOOKS: list[Callable[[], None]] = []
_EXITING = threading.RLock()  # held while the hooks run: a second caller waits for the first to finish
EXIT_HOOKS_WAIT_S = 30.0  # bound on that wait (each hook bounds its own work; this only backs them up)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit.

    A server holds a descriptor per connection: at the usual soft limit of 1024, about a thousand peers
    made libzmq abort the bus ("Too many open files"). The hard limit is usually far higher, and raising
    the soft one up to it needs no privilege."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):  # e.g. a hard limit above the kernel's nr_open: keep what there is
            pass
    return soft


def at_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when this process stops, however it stops (its work ends, it fails, or whoever started it
    stops it): for what would outlive it, such as a server it launched or files in /dev/shm."""
    _EXIT_HOOKS.append(fn)


def run_exit_hooks() -> None:
    """Run the hooks of ``at_exit`` once, newest first; one failing does not stop the others.

    Returns only once every hook has run, whoever runs them: a process whose work ends as it is told to
    stop calls this from two threads (the main thread's ``finally`` and the SIGTERM thread, which then
    exits the process), and the second must not exit while the first is still in a hook (a last
    heartbeat half sent, a server half stopped)."""
    acquired = _EXITING.acquire(timeout=EXIT_HOOKS_WAIT_S)
    try:
        while _EXIT_HOOKS:
            try:
                _EXIT_HOOKS.pop()()
            except Exception:  # noqa: BLE001 - a cleanup must not prevent the next one
                pass
    finally:
        if acquired:
            _EXITING.release()
