"""The local launcher's placement: the bus and every role replica as processes of this machine.

Every endpoint is an ipc path in the run's socket directory (``flow/endpoints.py``), so no socket
listens beyond this machine and no keys are needed. Role processes are spawned (forking a process that
holds a ZeroMQ context can hang); each dies with the launcher (``flow/worker.py``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import signal
import threading
import time
from typing import Callable

from flow.endpoints import LocalEndpoints
from flow.worker import role_main
from transfer import ServerConfig, spawn_server


class LocalPlacement:
    kind = "local"

    def __init__(self, sock_dir: str):
        self.sock_dir = sock_dir
        self.endpoints = LocalEndpoints(sock_dir)
        self.endpoints_spec = {"kind": "local", "sock_dir": sock_dir}
        self.keys_dir = self.keys = self.keys_parent = None  # nothing listens beyond this machine: no CURVE keys
        self.control_address = f"ipc://{sock_dir}/control"
        self.server = None
        self.procs: dict[tuple[str, int], mp.process.BaseProcess] = {}  # the live incarnation of each replica
        # Set by each process's watcher thread once it has reaped it. Only the watcher waits on a process:
        # a second thread's waitpid would fail (ECHILD) and multiprocessing would report it still alive.
        self.gone: dict[int, threading.Event] = {}
        self._ctx = mp.get_context("spawn")

    def start_bus(self, config: ServerConfig, on_exit: Callable[[str, str | None], None]) -> str:
        """Start the bus server's process; ``on_exit(what, detail)`` if it ends before ``stop``."""
        self.server = spawn_server(dataclasses.replace(config, address=f"ipc://{self.sock_dir}/bus"))
        self._watch(self.server.process, on_exit)
        return self.server.address

    def start_role(self, role: str, replica: int, args: tuple, on_exit: Callable[[str, str | None], None]) -> None:
        """Start ``role_main(*args)`` in its own process; ``on_exit(what, detail)`` when it ends."""
        p = self._ctx.Process(target=role_main, args=args, name=f"rlflow-{role}-{replica}")
        # The child starts with SIGTERM blocked (a signal mask survives fork and exec), so every thread it
        # makes, even while unpickling its arguments imports torch, leaves SIGTERM to the thread that
        # waits for it (flow/worker.py); one thread that does not block it would let SIGTERM kill the
        # process without its exit hooks.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.procs[(role, replica)] = p
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
                "roles": {f"{r}-{i}": p.pid for (r, i), p in self.procs.items()}}

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
