"""An environment worker: one process that runs one episode's environment at a time for a rollout replica.

Started by the replica's pool (``envs/pool.py``) as ``python -m rlflow.envs.worker`` with its settings as
one JSON line on stdin (the pool's address, this worker's token, the environment class and its
kwargs): a token never travels on a command line or in the environment. It connects to the pool,
says hello with the token, and then answers requests, one at a time:

    {"op": "reset", "episode": E, "record": {...}}  -> {"op": "reset", "episode": E, "ok": true, "observation": ...}
    {"op": "step",  "episode": E, "action": "..."}  -> {"op": "step", "episode": E, "ok": true,
                                                        "observation": ..., "reward": r, "done": d, "info": {...}}
    {"op": "close", "episode": E}                    (no reply: the environment's close() is called)
    {"op": "stop"}                                   (the worker exits)

With ``env.agent`` (``envs/agent.py``) the same ops drive an agent function instead: a reset starts it and
a step carries a completion (``"completion"`` for ``"action"``); either is answered with the agent's next
chat call (``"request"``: its messages) or its end (``"reward"``, ``"done": true``). A closed episode
whose agent does not return is the one case where the worker exits (``RECYCLE_EXIT``): a thread cannot be
killed, a process can, and the pool starts a fresh one.

A failed call (the environment raised, or returned the wrong shape: ``envs/base.py``) is answered with
``"ok": false`` and the error; the episode's environment is dropped, the worker stays. A call that never
returns is the pool's to end: it kills this process. The worker dies with the replica that started it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

MAX_MESSAGE_BYTES = 16 << 20  # a request carries a prompt record or one turn's text; a reply one observation
RECYCLE_EXIT = 75  # exits with this after a closed episode's agent would not return: the pool starts a fresh worker


def main() -> int:
    """A local worker process: its settings on stdin, and it dies with the replica that started it."""
    from rlflow.transfer.lifetime import die_with_parent

    line = sys.stdin.readline()
    if not line.strip():  # the pool that started this worker is gone before it said what to run
        return 0
    spec = json.loads(line)
    # The replica blocks SIGTERM for the thread that waits for it, and a signal mask survives exec: unblocked
    # here, or the signal that ends this worker with its replica would wait for ever.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    die_with_parent(spec["parent"])
    return serve(spec)


def serve(spec: dict, keys=None) -> int:
    """The worker loop for ``spec``; returns the exit code. ``keys``: this worker's CURVE keys when it
    connects over tcp (a Ray actor: ``flow/placement/ray_env.py``), its pool's key named in the address."""
    import zmq

    from rlflow.envs import base
    from rlflow.envs.agent import AgentEndpoint
    from rlflow.plugins import load_object
    from rlflow.transfer.security import connect

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.ROUTING_ID, spec["identity"].encode())
    connect(sock, spec["address"], keys)
    hello = {"op": "hello", "token": spec.get("token", ""), "pid": os.getpid()}
    try:
        if spec.get("agent"):  # an agent function behind a chat endpoint (envs/agent.py)
            for key in ("NO_PROXY", "no_proxy"):  # its client must reach 127.0.0.1 directly, whatever proxy is set
                os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1"]))
            fn = load_object(spec["agent"], "env.agent")
            if not callable(fn):
                raise TypeError(f"env.agent={spec['agent']} is not a function")
            agent, cls = AgentEndpoint(fn, spec["kwargs"], spec["agent"]), None
        else:
            agent, cls = None, load_object(spec["cls"], "env.cls")
        name = getattr(cls, "__name__", spec["cls"])
    except Exception as e:  # noqa: BLE001 - told to the pool, which fails the replica with it
        sock.send_json({**hello, "error": f"{type(e).__name__}: {e}"})
        return 1
    sock.send_json(hello)
    env, episode = None, None
    while True:
        req = sock.recv_json()
        op = req.get("op")
        if op == "stop":
            return 0
        if op == "close":
            _close(env)
            env, episode = None, None
            if agent is not None and not agent.close():  # its agent is still running: start afresh
                return RECYCLE_EXIT
            continue
        t0 = time.monotonic()
        try:
            if op == "reset":
                _close(env)
                episode = req["episode"]
                if agent is not None:
                    reply = agent.start(req["record"])
                else:
                    env = cls(**spec["kwargs"])
                    reply = {"observation": base.check_reset(base.run(env.reset(req["record"])), name)}
            elif op == "step" and agent is not None and req.get("episode") == episode:
                reply = agent.answer(req["completion"])
            elif op == "step" and env is not None and req.get("episode") == episode:
                step = base.check_step(base.run(env.step(req["action"])), name)
                reply = {"observation": step.observation, "reward": step.reward, "done": step.done, "info": step.info}
            else:
                raise RuntimeError(f"a {op!r} request for episode {req.get('episode')!r}, but this worker holds "
                                   f"{episode!r}: a bug in the pool")
            reply.update(ok=True)
        except Exception as e:  # noqa: BLE001 - the environment is user code: its failure costs its episode
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=-4)}
            _close(env)
            env, episode = None, None
        sock.send_json({"op": op, "episode": req.get("episode"), "seconds": time.monotonic() - t0, **reply})


def _close(env) -> None:
    from rlflow.envs.base import run

    close = getattr(env, "close", None)
    if close is None:
        return
    try:
        run(close())
    except Exception:  # noqa: BLE001 - the episode is over either way
        pass


if __name__ == "__main__":
    sys.exit(main())
