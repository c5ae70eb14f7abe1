"""Environment workers as Ray actors (``ray.env.actors=true``): a rollout replica's environments on nodes of their own.

By default a rollout replica's ``env.workers`` are processes beside it (``envs/pool.py``). With this,
each is a Ray actor with its own request (``ray.env``: ``cpus``, ``custom: {cpu_node: 1}``...), so
CPU-heavy or stateful environments scale on CPU nodes apart from the GPUs that generate. The pool does
not change: an actor runs the same worker loop as a local process (``envs/worker.serve``), and this
module gives the pool what it needs of a worker (start it, poll it, kill it) and of its socket.

Invariants:
- The replica creates its actors, so it owns them: Ray kills them when the replica's actor dies (Ray's
  ownership), and the pool kills and replaces one that times out, as it kills a process.
- Transport is tcp on the replica's node, under CURVE. The pool's socket serves with the replica's own
  keypair and its address names that key (``transfer/security.pinned``). Each actor makes its keypair
  where it runs, and only the public half comes back through Ray. The socket admits exactly the keys of
  the pool's live actors (a ZAP check), and every message must carry the key of the worker it claims
  to come from (ZAP's User-Id). No secret travels through Ray: the local workers' stdin token has no
  counterpart here, the keys do its job.
"""

from __future__ import annotations

import subprocess
import threading

import ray
import zmq

from rlflow.transfer.security import CurveKeys, pinned, serve_curve


class EnvWorkerActor:
    """One environment worker; its keypair is made here and its secret half never leaves."""

    def __init__(self):
        self.keypair = zmq.curve_keypair()

    def public_key(self) -> str:
        return self.keypair[0].decode()

    def serve(self, spec: dict) -> int:
        from rlflow.envs.worker import serve

        return serve(spec, CurveKeys(public=self.keypair[0], secret=self.keypair[1]))


class RayEnvWorkers:
    """The pool's way to start workers as Ray actors (``envs/pool.Spawner``)."""

    authenticates = True  # by CURVE key: the pool checks each message's User-Id, not a token

    @property
    def where(self) -> str:
        return f"Ray actors asking {self.options}"

    def __init__(self, resources: dict, keys: CurveKeys):
        """``resources``: Ray options of each actor (num_cpus, num_gpus, resources); ``keys``: the
        replica's own keypair (``ray_cluster.own_keys``)."""
        self.options = {**resources, "max_restarts": 0}
        self.keys = keys
        self.admitted: set[bytes] = set()
        self.lock = threading.Lock()  # the ZAP thread reads what the pool's thread changes
        self.auth = None

    def bind(self, sock: zmq.Socket) -> str:
        self.auth, public = serve_curve(sock.context, sock, CurveKeys(self.keys.public, self.keys.secret, authorized=self))
        sock.bind(f"tcp://{ray.util.get_node_ip_address()}:0")
        return pinned(sock.getsockopt_string(zmq.LAST_ENDPOINT), public)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: a client key is one of this pool's live actors'."""
        with self.lock:
            return key in self.admitted

    def start(self, spec: dict) -> "ActorWorker":
        return ActorWorker(self, spec)

    def sender(self, frame: zmq.Frame) -> bytes | None:
        """The CURVE key a message came with (ZAP's User-Id: the key's z85 text, as ``ActorWorker.key``)."""
        user = frame.get("User-Id")
        return user.encode() if user else None

    def admit(self, key: bytes) -> None:
        with self.lock:
            self.admitted.add(key)

    def forget(self, key: bytes | None) -> None:
        with self.lock:
            self.admitted.discard(key)

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()


class ActorWorker:
    """A worker actor as the pool handles a worker process: ``poll()``, ``kill()``, ``wait(timeout)``,
    ``returncode``, and ``key`` (its CURVE public key, once known). ``poll`` also moves it along: when its
    public key has come back, the key is admitted and the worker loop started."""

    def __init__(self, workers: RayEnvWorkers, spec: dict):
        self.workers, self.spec = workers, spec
        self.actor = ray.remote(EnvWorkerActor).options(**workers.options).remote()
        self.key_ref, self.run_ref = self.actor.public_key.remote(), None
        self.key: bytes | None = None
        self.returncode: int | None = None
        self.death: str | None = None  # how the actor was lost, when it was (the pool's error names it)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        ref = self.run_ref if self.run_ref is not None else self.key_ref
        if not ray.wait([ref], timeout=0)[0]:
            return None
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as e:  # the actor died (killed, OOM, node lost) or could not start
            self.death = f"Ray lost its actor: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            return self._ended(-9)
        if self.run_ref is None:
            self.key = value.encode()
            self.workers.admit(self.key)
            self.run_ref = self.actor.serve.remote(self.spec)
            return None
        return self._ended(int(value))

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def wait(self, timeout: float) -> int:
        ref = self.run_ref if self.run_ref is not None else self.key_ref
        if not ray.wait([ref], timeout=timeout)[0]:
            raise subprocess.TimeoutExpired("environment worker actor", timeout)
        code = self.poll()
        return self._ended(-9) if code is None else code  # a key came back after a kill: the actor is gone anyway

    def _ended(self, code: int) -> int:
        """The worker loop is over (it returned, or the actor died): its key goes, and so does the actor,
        with whatever it still runs (an agent that would not return)."""
        self.returncode = code
        self.workers.forget(self.key)
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already
            pass
        return code
