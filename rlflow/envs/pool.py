"""A rollout replica's environment workers: start them, route each episode's calls, bound every call.

    pool = EnvPool(cfg)                        # cfg: EnvConfig; starts cfg.workers worker processes
    pool.reset("g3-1@0.ab12", record)          # queued until a worker is free; that worker is then the episode's
    pool.step("g3-1@0.ab12", "calc(37*48)")    # to the episode's worker
    for out in pool.poll(0.05): ...            # Outcome per finished call: a reply, or how it failed
    pool.close("g3-1@0.ab12")                  # the episode is over: its worker is free again

Invariants:
- One episode per worker at a time: an episode's environment lives in its worker from ``reset`` to
  ``close``, so killing a worker costs exactly the episode it held.
- Every call is bounded by ``env.step_timeout_s``: past it the worker is killed, the episode fails with
  ``env_timeout`` and a fresh worker takes its place. A worker that dies fails its episode with
  ``env_died``. Neither stops the replica.
- A worker that cannot start (the class does not import) fails the replica at once, naming ``env.cls``:
  every worker would fail alike. Workers that keep dying before their hello stop the replica after
  ``MAX_START_FAILURES`` in a row rather than respawning for ever.
- Only the workers this pool started can talk to it. Local workers (``LocalWorkers``, the default)
  connect to an ipc socket in a private 0700 directory and must say hello with the token the pool gave
  each on its stdin. Workers elsewhere (Ray actors: ``flow/placement/ray_env.py``) connect over tcp
  under CURVE, and every message must carry the key of the worker it claims to come from. A message
  that is not a reply the pool is waiting for is dropped and counted (``stats["bad_messages"]``).
- Where workers run is the spawner's business (``Spawner``): the pool binds, starts, polls and kills
  workers only through it, so the protocol, the bounds and the replacement are the same everywhere.
- The queue of episodes waiting for a worker is bounded by the caller (the episode loop takes rows
  only while the queue is empty), so it holds at most one delivery's episodes.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from rlflow.envs.agent import BadRequest, chat_request
from rlflow.envs.base import Step
from rlflow.envs.config import EnvConfig
from rlflow.envs.worker import MAX_MESSAGE_BYTES, RECYCLE_EXIT

MAX_START_FAILURES = 3  # workers dying before their hello, in a row, before the replica gives up
KILL_WAIT_S = 5.0  # bound on reaping a killed worker


@dataclass
class Outcome:
    """How one reset or step of an episode ended."""

    episode: str
    op: str  # "reset" | "step"
    failure: str | None = None  # None: it returned; else "env_error" | "env_timeout" | "env_died"
    error: str = ""  # what failed, for the report
    observation: str | None = None
    step: Step | None = None  # a step's checked result (an agent's end: done, with its reward)
    request: dict | None = None  # an agent's chat call, checked (envs/agent.chat_request)
    seconds: float = 0.0  # time in the environment (the call's round trip)


@dataclass
class _Worker:
    index: int
    identity: bytes
    proc: subprocess.Popen
    started: float
    ready: bool = False
    episode: str | None = None  # the episode it holds, from reset to close
    record: dict | None = None  # that episode's record (a reset is re-queued if the worker recycles itself)
    call: str | None = None  # the op in flight, if any
    deadline: float = math.inf
    sent: float = 0.0
    closing: bool = False  # its episode was closed while a call was in flight: close once it answers


class Spawner(Protocol):
    """Where a pool's workers run: ``LocalWorkers`` (processes beside the replica) or Ray actors
    (``flow/placement/ray_env.RayEnvWorkers``)."""

    authenticates: bool  # True: workers are known by the CURVE key of their messages, not by a stdin token
    where: str  # for errors: what the workers are, e.g. "local processes"

    def bind(self, sock: zmq.Socket) -> str: ...  # bind the pool's socket; returns the address workers connect to
    def start(self, spec: dict) -> Any: ...  # a worker for ``spec``: a handle with poll(), kill(), wait(t), returncode
    def sender(self, frame: zmq.Frame) -> bytes | None: ...  # the worker key a message came with (authenticates)
    def close(self) -> None: ...


class LocalWorkers:
    """Workers as child processes of the replica, on an ipc socket in a private 0700 directory; each
    gets its settings, with its token, as one line on stdin (never on a command line)."""

    authenticates = False
    where = "local processes"

    def bind(self, sock: zmq.Socket) -> str:
        self.dir = tempfile.mkdtemp(prefix="rlflow-env-")  # 0700: only this user reaches the socket
        sock.bind(f"ipc://{self.dir}/pool")
        return f"ipc://{self.dir}/pool"

    def start(self, spec: dict) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "rlflow.envs.worker"], stdin=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps({**spec, "parent": os.getpid()}) + "\n")
        proc.stdin.close()
        return proc

    def sender(self, frame: zmq.Frame) -> bytes | None:
        return None

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class EnvPool:
    cfg: EnvConfig
    spawner: Any = None  # a Spawner; None: LocalWorkers
    stats: dict = field(default_factory=lambda: {"calls": 0, "timeouts": 0, "deaths": 0, "errors": 0,
                                                 "restarts": 0, "recycled": 0, "bad_messages": 0})

    def __post_init__(self) -> None:
        self.spawner = self.spawner or LocalWorkers()
        self.ctx = zmq.Context()  # its own: a CURVE server's ZAP handler is one per context
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.address = self.spawner.bind(self.sock)
        self.workers: dict[bytes, _Worker] = {}
        self.tokens: dict[bytes, str] = {}
        self.by_episode: dict[str, _Worker] = {}
        self.waiting: deque[tuple[str, dict]] = deque()  # (episode, record): resets waiting for a free worker
        self.failed_starts = 0
        self._generation = 0
        for i in range(self.cfg.workers):
            self._spawn(i)

    # ------------------------------------------------------------------ what the episode loop calls
    def reset(self, episode: str, record: dict) -> None:
        """Start ``episode`` on the next free worker (queued until there is one)."""
        self.waiting.append((episode, record))
        self._dispatch()

    def step(self, episode: str, action: str) -> None:
        """Send the model's turn to the episode's environment (its answer comes from ``poll``)."""
        self._step(episode, {"action": action})

    def answer(self, episode: str, completion: dict) -> None:
        """Send the episode's agent the completion of its chat call (``envs/agent.py``); its next call or
        its end comes from ``poll``."""
        self._step(episode, {"completion": completion})

    def _step(self, episode: str, payload: dict) -> None:
        w = self.by_episode.get(episode)
        if w is None:
            raise KeyError(f"episode {episode!r} holds no worker (it was never reset, or it failed)")
        self._send(w, {"op": "step", "episode": episode, **payload})

    def close(self, episode: str) -> None:
        """The episode is over: close its environment and free its worker."""
        w = self.by_episode.pop(episode, None)
        if w is not None and w.episode == episode:
            if w.call is None:
                w.episode = None
                self._post(w, {"op": "close", "episode": episode})
            else:
                w.closing = True
        self._dispatch()

    @property
    def queued(self) -> int:
        """Episodes waiting for a free worker."""
        return len(self.waiting)

    def poll(self, timeout: float) -> list[Outcome]:
        """Outcomes of the calls that ended, waiting up to ``timeout`` seconds for the first."""
        out: list[Outcome] = []
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(deadline, self._next_deadline()) - time.monotonic())
            while self.sock.poll(int(wait * 1000) if not out else 0):
                out += self._receive()
                wait = 0.0
            out += self._check_workers()
            self._dispatch()
            if out or time.monotonic() >= deadline:
                return out

    def shutdown(self) -> None:
        """Stop every worker (a polite stop, then a kill) and remove the socket's directory."""
        for w in self.workers.values():
            if w.ready:
                self._post(w, {"op": "stop"})
        t_end = time.monotonic() + 1.0
        for w in self.workers.values():
            try:
                w.proc.wait(max(0.0, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(KILL_WAIT_S)
        self.sock.close(0)
        self.spawner.close()
        self.ctx.term()

    # ------------------------------------------------------------------ workers
    def _spawn(self, index: int) -> None:
        self._generation += 1
        identity = f"w{index}.{self._generation}".encode()
        token = "" if self.spawner.authenticates else secrets.token_hex(16)
        proc = self.spawner.start({"address": self.address, "token": token, "identity": identity.decode(),
                                   "cls": self.cfg.cls, "agent": self.cfg.agent, "kwargs": self.cfg.kwargs})
        self.workers[identity], self.tokens[identity] = _Worker(index, identity, proc, time.monotonic()), token

    def _replace(self, w: _Worker) -> None:
        """Kill ``w`` (if still running) and start a fresh worker in its place."""
        if w.proc.poll() is None:
            w.proc.kill()
            try:
                w.proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        self.workers.pop(w.identity, None)
        self.tokens.pop(w.identity, None)
        if w.episode is not None:
            self.by_episode.pop(w.episode, None)
        self.stats["restarts"] += 1
        self._spawn(w.index)

    def _check_workers(self) -> list[Outcome]:
        """Calls past their deadline, workers that died, workers that never said hello."""
        out, now = [], time.monotonic()
        for w in list(self.workers.values()):
            dead = w.proc.poll() is not None
            if not w.ready:
                if dead or now - w.started > self.cfg.start_timeout_s:
                    self.failed_starts += 1
                    if self.failed_starts >= MAX_START_FAILURES:
                        raise RuntimeError(f"{MAX_START_FAILURES} environment workers ({self.spawner.where}) in a "
                                           f"row did not start ({self.cfg.what}): the last "
                                           f"{'exited with code ' + str(w.proc.returncode) if dead else 'did not say hello within env.start_timeout_s=' + str(self.cfg.start_timeout_s)}")
                    self._replace(w)
                continue
            if dead and w.proc.returncode == RECYCLE_EXIT:  # its closed episode's agent did not return
                self.stats["recycled"] += 1
                if w.call == "reset":  # the next episode had gone to it: it never started, so it goes first again
                    self.waiting.appendleft((w.episode, w.record))
                    self.by_episode.pop(w.episode, None)
                    w.episode = None
                self._replace(w)
                continue
            if w.call is not None and (dead or now > w.deadline):
                kind = "env_died" if dead else "env_timeout"
                self.stats["deaths" if dead else "timeouts"] += 1
                waited = (f"the agent neither called the model nor returned within env.step_timeout_s="
                          f"{self.cfg.step_timeout_s:g}s" if self.cfg.agent else
                          f"{w.call} took more than env.step_timeout_s={self.cfg.step_timeout_s:g}s")
                error = (f"the environment worker died ({_how(w.proc)}) during {w.call}" if dead else
                         f"{waited}: the worker was killed")
                out.append(Outcome(w.episode or "", w.call, kind, error, seconds=now - w.sent))
                self._replace(w)
            elif dead:
                self.stats["deaths"] += 1
                if w.episode is not None:  # died between calls, holding an episode
                    out.append(Outcome(w.episode, "step", "env_died",
                                       f"the environment worker died ({_how(w.proc)}) between turns"))
                self._replace(w)
        return out

    def _next_deadline(self) -> float:
        return min((w.deadline for w in self.workers.values() if w.call is not None), default=math.inf)

    # ------------------------------------------------------------------ messages
    def _dispatch(self) -> None:
        while self.waiting:
            free = next((w for w in self.workers.values() if w.ready and w.episode is None and w.call is None), None)
            if free is None:
                return
            episode, record = self.waiting.popleft()
            free.episode, free.record = episode, record
            self.by_episode[episode] = free
            self._send(free, {"op": "reset", "episode": episode, "record": record})

    def _send(self, w: _Worker, req: dict) -> None:
        w.call, w.sent = req["op"], time.monotonic()
        w.deadline = w.sent + self.cfg.step_timeout_s
        self.stats["calls"] += 1
        self._post(w, req)

    def _post(self, w: _Worker, req: dict) -> None:
        try:
            self.sock.send_multipart([w.identity, json.dumps(req).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:  # not connected (any more): its death or deadline is noticed by _check_workers
            pass

    def _receive(self) -> list[Outcome]:
        frames = self.sock.recv_multipart(copy=False)
        w = self.workers.get(frames[0].bytes)
        if w is not None and self.spawner.authenticates and self.spawner.sender(frames[-1]) != getattr(w.proc, "key", None):
            w = None  # a worker's identity, sent with another worker's key
        try:
            msg = json.loads(frames[-1].bytes) if len(frames) == 2 and w is not None else None
        except (ValueError, UnicodeDecodeError):
            msg = None
        if not isinstance(msg, dict):
            self.stats["bad_messages"] += 1
            return []
        if msg.get("op") == "hello":
            if w.ready or not hmac.compare_digest(str(msg.get("token", "")), self.tokens[w.identity]):
                self.stats["bad_messages"] += 1
                return []
            if "error" in msg:
                raise RuntimeError(f"{self.cfg.what}: the environment worker could not load it: {msg['error']}")
            w.ready, self.failed_starts = True, 0
            return []
        if w.call is None or msg.get("op") != w.call or msg.get("episode") != w.episode:
            self.stats["bad_messages"] += 1
            return []
        op, episode = w.call, w.episode
        w.call, w.deadline = None, math.inf
        seconds = time.monotonic() - w.sent
        if w.closing:  # closed while the call was in flight: its answer is not wanted
            w.episode, w.closing = None, False
            self._post(w, {"op": "close", "episode": episode})
            return []
        try:
            return [_outcome(op, episode, msg, seconds)]
        except (TypeError, ValueError, KeyError, BadRequest) as e:
            self.stats["bad_messages"] += 1
            return [Outcome(episode, op, "env_error", f"the environment worker sent a malformed reply: {e}", seconds=seconds)]
        finally:
            if not msg.get("ok"):
                self.stats["errors"] += 1


def _how(proc) -> str:
    """How a worker ended, for its episode's error: a process's exit code, or what its spawner knows."""
    return getattr(proc, "death", None) or f"exit code {proc.returncode}"


def _outcome(op: str, episode: str, msg: dict, seconds: float) -> Outcome:
    """The worker's reply as an Outcome, checked (the worker checked the environment's values already)."""
    if msg.get("ok") is not True:
        return Outcome(episode, op, "env_error", str(msg.get("error", "unknown error"))[:2000], seconds=seconds)
    observation = msg.get("observation")
    if observation is not None and not isinstance(observation, str):
        raise TypeError("observation is not text")
    if "request" in msg:  # an agent's chat call, checked again on this side of the socket
        return Outcome(episode, op, request=chat_request(msg["request"]), seconds=seconds)
    if op == "reset" and "reward" not in msg:
        return Outcome(episode, op, observation=observation, seconds=seconds)
    reward, done, info = msg["reward"], msg["done"], msg.get("info", {})
    if not isinstance(reward, (int, float)) or not math.isfinite(reward) or not isinstance(done, bool) \
            or not isinstance(info, dict) or not all(isinstance(v, (int, float)) for v in info.values()):
        raise TypeError("reward, done or info has the wrong type")
    return Outcome(episode, op, observation=observation, step=Step(observation, float(reward), done, dict(info)),
                   seconds=seconds)
