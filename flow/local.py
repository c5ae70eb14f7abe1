"""The local launcher's placement: the bus and every role replica as processes of this machine.

Every endpoint is an ipc path in the run's socket directory (``flow/endpoints.py``), so no socket
listens beyond this machine and no keys are needed. Role processes are spawned (forking a process that
holds a ZeroMQ context can hang); each dies with the launcher (``flow/worker.py``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
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
        self.procs: list[tuple[str, int, mp.process.BaseProcess]] = []
        self._ctx = mp.get_context("spawn")

    def start_bus(self, config: ServerConfig) -> str:
        self.server = spawn_server(dataclasses.replace(config, address=f"ipc://{self.sock_dir}/bus"))
        return self.server.address

    def start_role(self, role: str, replica: int, args: tuple, on_exit: Callable[[str, str | None], None]) -> None:
        """Start ``role_main(*args)`` in its own process; ``on_exit(what, detail)`` when it ends."""
        p = self._ctx.Process(target=role_main, args=args, name=f"rlflow-{role}-{replica}")
        p.start()
        self.procs.append((role, replica, p))

        def watch() -> None:
            p.join()
            on_exit(f"exited with code {p.exitcode}", None)

        threading.Thread(target=watch, daemon=True).start()

    def wait_started(self) -> None:
        """Nothing to wait for: a spawned process is running (a role that fails to start reports it)."""

    def processes(self) -> dict:
        return {"bus": self.server.process.pid if self.server else None,
                "roles": {f"{r}-{i}": p.pid for r, i, p in self.procs}}

    def stop(self, shutdown_seconds: float, warn: Callable[[str], None]) -> None:
        """SIGTERM every role, kill what is left after ``shutdown_seconds``, then stop the bus."""
        for _, _, p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + shutdown_seconds
        for role, replica, p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                warn(f"{role}-{replica} did not stop in {shutdown_seconds}s: killed")
                p.kill()
                p.join(5)
        if self.server is not None:
            self.server.stop()
