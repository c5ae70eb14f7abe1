"""The local launcher's placement: the bus and every role replica as processes of this machine.

Every endpoint is an ipc path in the run's socket directory (``flow/placement/endpoints.py``), so no socket
listens beyond this machine and no keys are needed. Each dies with the launcher (``flow/placement/worker.py``).

Role processes are forked from a forkserver (``start_forkserver``): a fresh interpreter, started as soon
as the launcher knows the run is local, that imports what every role imports (torch, transformers, the
role modules) once, while the launcher prepares the run; each role is then a fork of it and starts in
a fraction of a second instead of importing torch itself, several at once on a few cores. The launcher
itself is never forked (forking a process that holds a ZeroMQ context can hang); the bus server is
spawned (it needs neither torch nor the roles).
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Callable

from rlflow.flow.placement.endpoints import LocalEndpoints
from rlflow.flow.placement.plan import ReplicaPlan
from rlflow.flow.placement.worker import role_main
from rlflow.roles import SERVE
from rlflow.transfer import ServerConfig, spawn_server


PRELOAD = ["rlflow.flow.placement.sigterm_blocked", "rlflow.flow.placement.worker", *SERVE.values(), "rlflow.engines.hf",
           "transformers.models.qwen2.modeling_qwen2"]
"""What the forkserver imports once for every role (a module that fails to import is skipped)."""


def start_forkserver() -> None:
    """Start (once per launcher) the forkserver every local role is forked from; returns at once, while
    it imports ``PRELOAD``. Its first preload blocks SIGTERM (``sigterm_blocked.py``), so every role
    starts with SIGTERM blocked in every thread, even those made while its arguments are unpickled:
    SIGTERM belongs to the thread that waits for it (``worker._exit_on_sigterm``). The launcher stops it as it exits (``stop_forkserver``)."""
    from multiprocessing import forkserver

    if forkserver_pid() is not None:
        return
    mp.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    atexit.register(stop_forkserver)


FORKSERVER_STOP_S = 10.0  # bound on reaping the killed forkserver


def stop_forkserver() -> None:
    """Stop the forkserver and reap it, so that it does not outlive the launcher even as a zombie.

    It is killed rather than asked to exit: it holds nothing worth a graceful exit (it writes nothing,
    and the roles it forked are gone, or past ``flow.shutdown_seconds`` and killed already), while its
    interpreter's teardown with torch loaded takes most of a second that every run would wait for.
    multiprocessing keeps no public handle on it, hence its private fields, read defensively: without
    them nothing is done and the forkserver exits by itself (its "alive" pipe closes) with the launcher."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid, alive = getattr(server, "_forkserver_pid", None), getattr(server, "_forkserver_alive_fd", None)
    if pid is None or alive is None:
        return
    server._forkserver_pid = server._forkserver_alive_fd = None
    os.close(alive)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone (not yet reaped: the wait below does it)
        pass
    deadline = time.monotonic() + FORKSERVER_STOP_S
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:  # stuck in the kernel (uninterruptible I/O): init reaps it later
            return
        time.sleep(0.01)


def forkserver_pid() -> int | None:
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


class LocalPlacement:
    kind = "local"
    env_actors = None  # environment workers are processes beside their rollout replica

    def __init__(self, sock_dir: str):
        self.sock_dir = sock_dir
        self.endpoints = LocalEndpoints(sock_dir)
        self.endpoints_spec = {"kind": "local", "sock_dir": sock_dir}
        self.keys_dir = self.launcher_keys = None  # nothing listens beyond this machine: no CURVE keys
        self.control_address = f"ipc://{sock_dir}/control"
        self.server = None
        self.procs: dict[tuple[str, int], mp.process.BaseProcess] = {}  # the live incarnation of each replica
        # Set by each process's watcher thread once it has reaped it. Only the watcher waits on a process:
        # a second thread's waitpid would fail (ECHILD) and multiprocessing would report it still alive.
        self.gone: dict[int, threading.Event] = {}
        self._ctx = mp.get_context("forkserver")
        start_forkserver()

    def start_bus(self, config: ServerConfig, on_exit: Callable[[str, str | None], None]) -> str:
        """Start the bus server's process; ``on_exit(what, detail)`` if it ends before ``stop``."""
        self.server = spawn_server(dataclasses.replace(config, address=f"ipc://{self.sock_dir}/bus"))
        self._watch(self.server.process, on_exit)
        return self.server.address

    def start_role(self, plan: ReplicaPlan, on_exit: Callable[[str, str | None], None]) -> None:
        """Start ``role_main(plan)`` in its own process; ``on_exit(what, detail)`` when it ends."""
        p = self._ctx.Process(target=role_main, args=(plan,), name=f"rlflow-{plan.name}")
        p.start()  # with SIGTERM blocked from birth: the forkserver's mask (``start_forkserver``)
        self.procs[(plan.role, plan.replica)] = p
        self._watch(p, on_exit)

    def kill_role(self, role: str, replica: int, timeout: float) -> None:
        """SIGKILL the replica's process (frozen ones too) and wait, bounded, until it is gone."""
        p = self.procs.get((role, replica))
        if p is None:
            return
        p.kill()
        if not self.gone[p.pid].wait(timeout):
            raise RuntimeError(f"{role}-{replica} (pid {p.pid}) is still alive {timeout:.0f}s after SIGKILL")

    def wait_started(self) -> None:
        """Nothing to wait for: a spawned process is running (a role that fails to start reports it)."""

    def processes(self) -> dict:
        return {"bus": self.server.process.pid if self.server else None,
                "roles": {f"{r}-{i}": p.pid for (r, i), p in self.procs.items()}, "forkserver": forkserver_pid()}

    def stop(self, shutdown_seconds: float, warn: Callable[[str], None]) -> None:
        """SIGTERM every role, kill what is left after ``shutdown_seconds``, then stop the bus."""
        for p in self.procs.values():
            if not self.gone[p.pid].is_set():
                p.terminate()
        deadline = time.monotonic() + shutdown_seconds
        for (role, replica), p in self.procs.items():
            if not self.gone[p.pid].wait(max(0.0, deadline - time.monotonic())):
                warn(f"{role}-{replica} did not stop in {shutdown_seconds}s: killed")
                p.kill()
                self.gone[p.pid].wait(5)
        if self.server is not None:  # its watcher reaps it, so not ServerProcess.stop (see ``gone``)
            bus = self.server.process
            bus.terminate()
            if not self.gone[bus.pid].wait(shutdown_seconds):
                warn(f"the bus did not stop in {shutdown_seconds}s: killed")
                bus.kill()
                self.gone[bus.pid].wait(5)

    def _watch(self, p: mp.process.BaseProcess, on_exit: Callable[[str, str | None], None]) -> None:
        """Reap ``p`` on a thread of its own, then tell ``on_exit`` and whoever waits on ``gone``."""
        gone = self.gone[p.pid] = threading.Event()

        def watch() -> None:
            p.join()
            gone.set()
            on_exit(f"exited with code {p.exitcode}", None)

        threading.Thread(target=watch, name=f"rlflow-watch-{p.name}", daemon=True).start()
