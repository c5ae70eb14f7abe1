"""User code with a time limit per call: a function run in a child process that can be killed.

The child gets a whole batch and sends one result per item as it goes, so a batch costs one round trip
plus a small message per item. A call that runs past the limit (an endless loop, a regex that
backtracks for ever, a hung network call) is ended by killing the child: that item gets an error
result saying so, and a fresh child takes the rest of the batch. Killing a process is the only way to
stop arbitrary code, a C extension holding the GIL included. This module imports nothing heavy, so a
sandbox starts as fast as the user's own module imports.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import numbers
import os
import signal
import threading
import traceback

from rlflow.transfer.lifetime import die_with_parent

START_S = 120.0  # bound on a fresh sandbox importing the function (its module may import a lot)


def call(fn, response: str, fields: dict) -> tuple:
    """One call of user code, never raising: ``("ok", reward)`` or ``("error", kind, message, traceback)``.

    ``kind`` tells failures apart for reporting (each kind's first occurrence is shown in full, the rest
    counted): an exception's type and the line of user code that raised it, or what was returned instead
    of a number. A reward must be a finite real number (int, float, bool, a numpy scalar): anything else,
    ``None`` and the string ``"1.0"`` included, is an error naming its type, never a silent conversion.
    """
    try:
        value = fn(response, **fields)
    except Exception as e:  # user code: a fault boundary by design (see the module docstring)
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return ("error", f"{type(e).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}",
                f"raised {type(e).__name__}: {e}", traceback.format_exc(limit=-3))
    if isinstance(value, numbers.Real):
        reward = float(value)
        if math.isfinite(reward):
            return ("ok", reward)
        return ("error", f"returned {reward}", f"returned {reward}: a reward must be a finite number", "")
    shown = repr(value)
    return ("error", f"returned {type(value).__name__}",
            f"returned {type(value).__name__} {shown[:60] + ('...' if len(shown) > 60 else '')}: a reward function "
            f"must return a number (int, float or bool) for every response", "")


class Sandbox:
    """The reward function in a child process, each call bounded by ``timeout_s`` (see the module docstring).

    The child gets a whole batch and sends one result per sample as it goes, so a batch costs one
    round trip plus a small message per sample; only a call that overruns costs a restart.
    """

    def __init__(self, fn_path: str, timeout_s: float):
        self.fn_path, self.timeout_s = fn_path, timeout_s
        self._mp = mp.get_context("spawn")  # forking a process that holds ZeroMQ sockets can hang
        self.proc = self.conn = None
        self.ready = False  # the process has imported ``fn`` and waits for batches
        self.restarts = 0
        # ``shut`` runs on the role's SIGTERM thread while its main thread may be scoring. The lock makes a
        # launch and the shut exclusive: a child is never left half-started (spawned, its start-up data
        # unsent) by a role that exits, and none is launched once the role is stopping.
        self._lock = threading.RLock()
        self._shut = False

    def launch(self) -> tuple:
        """Start a sandbox process without waiting for it (the first ``score`` waits until it is ready): a
        role launches it before its other start-up work, so the two overlap. Returns (process, pipe)."""
        with self._lock:
            self._raise_if_shut()
            parent, child = self._mp.Pipe()
            self.proc = self._mp.Process(target=_sandbox_main, args=(self.fn_path, child, os.getpid()),
                                         name="rlflow-reward-sandbox", daemon=True)
            self.proc.start()
            child.close()
            self.conn, self.ready = parent, False
            return self.proc, self.conn

    def _current(self) -> tuple:
        """(process, pipe) of the running sandbox, launching one if there is none; read under the lock, so
        a ``shut`` from another thread shows as the error it is, never as a half-cleared field."""
        with self._lock:
            self._raise_if_shut()
            return (self.proc, self.conn) if self.proc is not None else self.launch()

    def _start(self) -> None:
        """Wait (bounded by START_S, not the per-call limit) until the sandbox has imported ``fn``, launching
        it first if there is none."""
        proc, parent = self._current()  # this thread's own references: ``shut`` may clear the fields
        try:
            if not parent.poll(START_S):
                self.close()
                raise TimeoutError(f"the reward sandbox did not import reward.fn={self.fn_path!r} within {START_S:.0f}s")
            status = parent.recv()
        except (EOFError, OSError):
            self._raise_if_shut()
            status = ("failed", f"the sandbox process exited with code {proc.join(5) or proc.exitcode}")
        if status[0] != "ready":
            self.close()
            raise RuntimeError(f"the reward sandbox could not load reward.fn={self.fn_path!r}: {status[1]}")
        self.ready = True

    def score(self, texts: list[str], fields: list[dict]) -> list[tuple]:
        """One result per sample, as ``call`` gives it; a call past the limit is an error result."""
        results: list[tuple] = []
        while len(results) < len(texts):
            if self.proc is None or not self.ready:
                self._start()
            proc, conn = self._current()  # this thread's own references: ``shut`` may clear the fields
            try:
                conn.send((texts[len(results):], fields[len(results):]))
                while len(results) < len(texts):
                    if not conn.poll(self.timeout_s):
                        error = ("timeout", f"ran past reward.timeout_s={self.timeout_s:g}s and was stopped")
                        break
                    results.append(conn.recv())
            except (EOFError, OSError):  # the sandbox died (the function crashed the interpreter), or was shut
                self._raise_if_shut()
                proc.join(5)
                error = ("process died", f"took its process down (exit code {proc.exitcode})")
            if len(results) < len(texts):
                self._raise_if_shut()
                results.append(("error", *error, ""))
                self.close()  # the rest of the batch goes to a fresh sandbox
                self.restarts += 1
        return results

    def _raise_if_shut(self) -> None:
        if self._shut:
            raise RuntimeError("the reward sandbox was shut while scoring: its role is stopping")

    def shut(self) -> None:
        """Close for good, from any thread (the role's exit hook): no sandbox is launched after this."""
        with self._lock:
            self._shut = True
            self.close()

    def close(self) -> None:
        """Kill the sandbox process; the next ``score`` launches a fresh one."""
        with self._lock:
            if self.proc is not None:
                self.proc.kill()
                self.proc.join(10)
                self.conn.close()
                self.proc = self.conn = None
                self.ready = False


def _sandbox_main(fn_path: str, conn, parent: int) -> None:
    """The sandbox process: score every batch it is sent, one result message per sample."""
    die_with_parent(parent, signal.SIGKILL)
    try:
        module, _, name = fn_path.rpartition(".")
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - reported to the role, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            texts, fields = conn.recv()
        except EOFError:  # the reward role closed the pipe
            return
        for text, f in zip(texts, fields):
            conn.send(call(fn, text, f))
