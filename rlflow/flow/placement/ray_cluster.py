"""The Ray launcher's placement: the bus and every role replica as Ray actors with their resource requests.

    launcher (Ray driver) ── registry actor   names -> tcp addresses (flow/placement/endpoints.py)
                          ├─ bus actor        the bus server on a thread, tcp on its node, CURVE
                          └─ role actors      one per replica: run_role (flow/placement/worker.py), as a local process would

Ray places and supervises; it does not carry data. Rows travel over our bus and weights over our channel,
both tcp on each node's IP under CURVE: every process has a keypair of its own, which is its client key
and the server key of whatever it serves; each server's advertised address names its public key, and
every server admits only the client keys the launcher registered for this run (``RunKeys``). Ray carries
no secret either: an actor's arguments are its plan without them, and it fetches them from the launcher's
credential service, authenticated by a keypair it made itself and whose public half alone went through
Ray (``flow/placement/credentials.py``). Actors hold their secrets in memory; nothing is written on their node.

Invariants:
- ``ray.address`` null starts a private cluster on this machine (``address="local"``: never someone
  else's) in the run's own temp directory, shut down with the run; otherwise the run joins that cluster
  in a namespace of its own and removes only its own actors.
- Every actor is placed within ``ray.start_timeout`` or the run fails naming the pending replicas, what
  they asked for and what the cluster has free (an unplaceable request otherwise waits forever). On a
  private cluster a request its one node cannot meet fails at once (no autoscaler will add a node).
- A role actor that dies (killed, OOM, node lost) is reported like a local process that exits: the run
  stops with that role's name. A role that fails reports its traceback over the control socket first.
- Stopping: every actor gets ``stop`` (its exit hooks), bounded by ``shutdown_seconds``, and is
  then killed: a role owns nothing that outlives it (flow/placement/worker.py), so killing it is its designed exit.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import uuid
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlflow.flow.config import StartError
from rlflow.flow.placement import credentials
from rlflow.flow.placement.endpoints import RayEndpoints
from rlflow.flow.placement.plan import ReplicaPlan
from rlflow.flow.placement.worker import run_role
from rlflow.transfer import ServerConfig
from rlflow.transfer.security import CurveKeys, keygen, load_keys

REGISTRY = "rlflow-registry"
LOG_DRAIN_S = 1.0  # Ray forwards what actors print through its log monitor, a few hundred ms behind; the
# last lines (a failing role's own prints, the user's best clue) would be lost to a shutdown right away


class Registry:
    """Endpoint name -> address for one run (a named actor in the run's namespace)."""

    def __init__(self):
        self.addresses: dict[str, str] = {}

    def put(self, name: str, address: str) -> None:
        self.addresses[name] = address

    def get(self, name: str) -> str | None:
        return self.addresses.get(name)

    def delete(self, name: str) -> None:
        self.addresses.pop(name, None)


class RunKeys:
    """The ZAP check of every server of a Ray run: a client key is one the launcher registered for a
    process of this run (``curve/<key>`` in the registry), looked up at each handshake; a yes is kept."""

    def __init__(self, namespace: str):
        self.namespace, self.known, self._registry = namespace, set(), None

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.known:
            return True
        try:
            if self._registry is None:
                self._registry = ray.get_actor(REGISTRY, namespace=self.namespace)
            ok = ray.get(self._registry.get.remote(f"curve/{key.decode()}"), timeout=10) is not None
        except Exception:  # noqa: BLE001 - the registry is gone (the run is stopping): refuse
            return False
        if ok:
            self.known.add(key)
        return ok


def own_keys(keypair: tuple[bytes, bytes], namespace: str) -> CurveKeys:
    """An actor's CURVE keys: its own keypair, as a client and as a server (each server of the run has its
    own, named in the address it advertises), and the run's registry as the client keys it accepts."""
    return CurveKeys(public=keypair[0], secret=keypair[1], authorized=RunKeys(namespace))


class _Keyed:
    """An actor's own CURVE keypair, made where it runs; only the public half leaves (``public_key``).
    It authenticates the actor to the credential service, is its client key on every socket and the
    server key of every socket it serves (``own_keys``)."""

    def __init__(self):
        import zmq

        self.keypair = zmq.curve_keypair()

    def public_key(self) -> str:
        return self.keypair[0].decode()


class BusActor(_Keyed):
    """Hosts the bus server on a thread, bound on this node's IP (CURVE: it listens beyond loopback)."""

    def start(self, config: ServerConfig, service: tuple[str, str], timeout: float) -> str:
        """Serve ``config`` completed with the secrets fetched from the launcher's ``service``."""
        from rlflow.transfer.server import serve_in_thread

        config = credentials.join_server(config, credentials.fetch(service, self.keypair, timeout))
        config = dataclasses.replace(config, address=f"tcp://{ray.util.get_node_ip_address()}:0",
                                     keys_dir=own_keys(self.keypair, ray.get_runtime_context().namespace))
        self.server, self.thread = serve_in_thread(config)
        return self.server.address

    def serving(self) -> None:
        """Returns when the bus stops serving (the launcher's watch: an error if this actor dies)."""
        self.thread.join()

    def where(self) -> dict:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def stop(self) -> None:
        """Nothing to clean up: the keys are in memory; the launcher then kills this actor."""


class RoleActor(_Keyed):
    """One role replica. Threaded so that ``stop`` and ``public_key`` run while ``run`` is busy."""

    def where(self) -> dict:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def run(self, plan: ReplicaPlan) -> int:
        """``plan`` comes without its secrets: fetched first, from the service the plan names."""
        plan = credentials.join(plan, credentials.fetch(plan.wiring.credentials, self.keypair, plan.wiring.wait_seconds))
        keys = own_keys(self.keypair, plan.wiring.endpoints["namespace"])
        return run_role(plan.replace(wiring=dataclasses.replace(plan.wiring, keys=keys)))

    def stop(self) -> None:
        """Run the role's exit hooks; the launcher then kills it."""
        from rlflow.transfer.lifetime import run_exit_hooks

        run_exit_hooks()
        sys.stdout.flush()  # what the role printed reaches its log file, which Ray forwards to the driver
        sys.stderr.flush()


def _resources(res) -> dict:
    """A RoleResources as Ray actor options."""
    return {"num_cpus": res.cpus, "num_gpus": res.gpus, "resources": dict(res.custom) or None}


def _bundle(res) -> dict[str, float]:
    bundle = {"CPU": res.cpus, "GPU": res.gpus, **res.custom}
    return {k: float(v) for k, v in bundle.items() if v > 0}


class RayPlacement:
    kind = "ray"

    def __init__(self, cfg, roles: list[tuple[str, int]], sock_dir: str, log: Callable[[str], None]):
        """``roles``: (role, replica) of every actor to come, so a placement group can hold them all."""
        self.cfg, self.log = cfg.ray, log
        self.env_workers = cfg.env.workers if cfg.env.enabled else 0
        # each environment worker's actor options (flow/placement/ray_env.py), or None: processes beside the rollout
        self.env_actors = _resources(self.cfg.env) if self.cfg.env.actors and self.env_workers else None
        self.namespace = f"rlflow-{uuid.uuid4().hex[:12]}"
        self.private = self.cfg.address is None
        self.temp_dir = os.path.join(sock_dir, "ray") if self.private else None  # the private cluster's files
        # The launcher's keys: its client key and the control socket's server key. The files stay on this
        # node (``rlflow bus stats RUN_DIR`` reads them); actors make their own (``own_keys``).
        self.keys_dir = str(keygen(os.path.join(sock_dir, "keys")))
        self.client_keys: dict[tuple[str, int], str] = {}  # replica -> its registered public key
        t0 = time.monotonic()
        self._init(roles)
        try:
            self._prepare(roles)
        except BaseException:
            ray.shutdown()  # the constructor failed, so no stop() will: the private cluster goes now
            raise
        self.log(f"ray: {'private local cluster' if self.private else 'joined ' + str(self.cfg.address)} "
                 f"in {time.monotonic() - t0:.1f}s; resources {ray.cluster_resources()}")

    def _prepare(self, roles) -> None:
        """The registry, the feasibility check, the placement group and every actor (created, not started)."""
        self.host = ray.util.get_node_ip_address()
        self.control_address = f"tcp://{self.host}:0"
        self.service = credentials.CredentialService(self.host)
        self.registry = ray.remote(Registry).options(name=REGISTRY, num_cpus=0).remote()
        self.endpoints = RayEndpoints(REGISTRY, self.namespace)
        # The launcher's client key (the key directory's, which ``rlflow bus stats RUN_DIR`` also uses).
        keys = load_keys(self.keys_dir)
        ray.get(self.registry.put.remote(f"curve/{keys.public.decode()}", "launcher"), timeout=60)
        self.launcher_keys = dataclasses.replace(keys, authorized=RunKeys(self.namespace))
        self.endpoints_spec = {"kind": "ray", "registry": REGISTRY, "namespace": self.namespace}
        if self.private:  # no autoscaler can add a node: a request no node meets now never will
            self._check_feasible(roles)
        self.pg = None
        self._bundles: dict[tuple[str, int], int] = {}
        if self.cfg.placement is not None:
            self._place_group(roles)
        # Every actor is created now, so that Ray starts their worker processes in parallel with the bus.
        self.bus = ray.remote(BusActor).options(max_concurrency=3,
                                                **self._options(self.cfg.bus, None, "rlflow-bus")).remote()
        self.handles = {(r, i): self._role_actor(r, i, f"rlflow-{r}-{i}") for r, i in roles}
        self.runs: dict[tuple[str, int], object] = {}  # the ref of each replica's run() call
        self.started: dict[str, object] = {}  # "role-i" -> the ref of its where() call: answered once it runs
        self.where: dict[str, dict] = {}

    def _init(self, roles) -> None:
        if not sys.stdout.isatty():  # Ray colours its log prefixes; in a pipe or a file they are escape noise
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        runtime_env = dict(self.cfg.runtime_env)
        if self.private:  # workers import what this process imports: its cwd and PYTHONPATH
            path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
            runtime_env.setdefault("env_vars", {}).setdefault("PYTHONPATH", path)
            asked = self.cfg.bus.cpus + sum(getattr(self.cfg, r).cpus for r, _ in roles)
            if self.cfg.env.actors:  # each rollout replica's environment workers (flow/placement/ray_env.py)
                asked += self.cfg.env.cpus * self.env_workers * sum(r == "rollout" for r, _ in roles)
            ray.init(address="local", namespace=self.namespace, include_dashboard=False,
                     num_cpus=self.cfg.num_cpus or max(os.cpu_count() or 1, int(asked + 0.999)),
                     num_gpus=self.cfg.num_gpus, resources=dict(self.cfg.resources) or None,
                     object_store_memory=self.cfg.object_store_mb << 20,
                     _temp_dir=self.temp_dir, runtime_env=runtime_env or None,
                     logging_level="WARNING", log_to_driver=True)
        else:
            try:
                ray.init(address=self.cfg.address, namespace=self.namespace, runtime_env=runtime_env or None,
                         logging_level="WARNING", log_to_driver=True)
            except ConnectionError as e:
                raise StartError(f"could not join the Ray cluster at ray.address={self.cfg.address!r}: {_first_line(e)}"
                                 f"{'; ' + _first_line(e.__cause__) if e.__cause__ else ''}. Is it running and "
                                 f"reachable? With token authentication, make its token available here "
                                 f"(~/.ray/auth_token or RAY_AUTH_TOKEN)") from e

    def _check_feasible(self, roles) -> None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        asks = {"bus": _bundle(self.cfg.bus), **{f"{r}-{i}": _bundle(getattr(self.cfg, r)) for r, i in roles}}
        if self.cfg.env.actors and self.env_workers:
            asks["env"] = _bundle(self.cfg.env)  # each environment worker actor's
        for name, ask in asks.items():
            if not any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in nodes):
                raise StartError(f"no node of the private Ray cluster can meet {name}'s request {ask}: its node has "
                                 f"{ {k: v for k, v in nodes[0].items() if not k.startswith('node:')} }. Lower "
                                 f"ray.{name.split('-')[0]} (cpus/gpus/custom), or give the cluster what it needs "
                                 f"(ray.num_cpus, ray.num_gpus, ray.resources)")

    def _place_group(self, roles) -> None:
        bundles = [_bundle(self.cfg.bus)] + [_bundle(getattr(self.cfg, r)) for r, _ in roles]
        self.pg = placement_group(bundles, strategy=self.cfg.placement, name=f"{self.namespace}-pg")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.cfg.start_timeout)
        if not ready:
            raise StartError(f"ray.placement={self.cfg.placement}: the cluster could not place {len(bundles)} "
                             f"bundles {bundles} within ray.start_timeout={self.cfg.start_timeout:.0f}s; it has "
                             f"{ray.available_resources()} free")
        self._bundles = {key: i + 1 for i, key in enumerate(roles)}

    def _role_actor(self, role: str, replica: int, name: str):
        return ray.remote(RoleActor).options(max_concurrency=3, **self._options(getattr(self.cfg, role), (role, replica),
                                                                                name)).remote()

    def _options(self, res, key: tuple[str, int] | None, name: str) -> dict:
        opts = {**_resources(res), "name": name, "max_restarts": 0}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=0 if key is None else self._bundles[key])
        return opts

    # ------------------------------------------------------------------ the bus and the roles
    def start_bus(self, config: ServerConfig, on_exit: Callable[[str, str | None], None]) -> str:
        """Start the bus in its actor; ``on_exit(what, detail)`` if the actor dies or the bus stops."""
        public, secrets = credentials.split_server(config)
        self._admit(self.bus, secrets, "bus")
        ref = self.bus.start.remote(public, self.service.where, self.cfg.start_timeout)
        ready, _ = ray.wait([ref], timeout=self.cfg.start_timeout)
        if not ready:
            raise StartError(self._pending_message(["bus"]))
        try:
            address = ray.get(ref)
            self.where["bus"] = ray.get(self.bus.where.remote())
        except ray.exceptions.RayError as e:
            raise StartError(_could_not_start("the bus", e)) from e
        _watch(self.bus.serving.remote(), "bus", on_exit)
        return address

    def start_role(self, plan: ReplicaPlan, on_exit: Callable[[str, str | None], None]) -> None:
        """Start ``run_role(plan)`` in the replica's actor; ``on_exit(what, detail)`` when that call ends.

        A restarted replica (its actor killed by ``kill_role``) gets a new actor in the same bundle.
        """
        name, key = plan.name, (plan.role, plan.replica)
        if key not in self.handles:
            self.handles[key] = self._role_actor(plan.role, plan.replica, f"rlflow-{name}.{plan.incarnation}")
        actor = self.handles[key]
        public, secrets = credentials.split(plan.replace(wiring=dataclasses.replace(plan.wiring,
                                                                                  credentials=self.service.where)))
        self.runs[key] = run_ref = actor.run.remote(public)
        threading.Thread(target=self._admit, args=(actor, secrets, name, key), name=f"rlflow-admit-{name}",
                         daemon=True).start()  # the run waits for it (bounded by flow.wait_seconds)
        self.started[name] = actor.where.remote()
        _watch(run_ref, name, on_exit)

    def _admit(self, actor, secrets: dict, name: str, key: tuple[str, int] | None = None) -> None:
        """Register the actor's own key (its public half, from Ray) as a client of the run's servers, then
        let it fetch ``secrets`` once. An actor that never answers is the placement's concern
        (``wait_started``); its run then fails on its own bound."""
        try:
            public_key = ray.get(actor.public_key.remote(), timeout=self.cfg.start_timeout)
            ray.get(self.registry.put.remote(f"curve/{public_key}", name), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if key is not None:
            self.client_keys[key] = public_key
        self.service.admit(public_key, secrets)

    def kill_role(self, role: str, replica: int, timeout: float) -> None:
        """Kill the replica's actor (its process, frozen or not) and wait, bounded, until Ray reports it gone."""
        actor = self.handles.pop((role, replica), None)
        if actor is None:
            return
        ray.kill(actor, no_restart=True)
        if (public_key := self.client_keys.pop((role, replica), None)) is not None:  # its key dies with it
            ray.get(self.registry.delete.remote(f"curve/{public_key}"), timeout=60)
        done, _ = ray.wait([self.runs[(role, replica)]], timeout=timeout)
        if not done:
            raise RuntimeError(f"Ray did not report {role}-{replica} gone within {timeout:.0f}s of killing it")
        self.where.pop(f"{role}-{replica}", None)

    def wait_started(self) -> None:
        """Wait until every role actor is placed and running; the error names what is still pending."""
        refs = {name: ref for name, ref in self.started.items() if name not in self.where}
        if not refs:
            return
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.start_timeout)
        if pending:
            raise StartError(self._pending_message([n for n, r in refs.items() if r in pending]))
        for name, ref in refs.items():
            try:
                self.where[name] = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise StartError(_could_not_start(name, e)) from e

    def _pending_message(self, pending: list[str]) -> str:
        """``pending``: actor names ("bus", "rollout-1"); each one's request is its role's ``ray.<role>``."""
        asks = ", ".join(f"{n} asks {_bundle(getattr(self.cfg, n.split('-')[0])) or '{}'}" for n in pending)
        return (f"the Ray cluster did not start {', '.join(pending)} within ray.start_timeout="
                f"{self.cfg.start_timeout:.0f}s: {asks}; the cluster has {ray.available_resources()} free of "
                f"{ray.cluster_resources()}. Lower the requests (ray.<role>.cpus/gpus) or add nodes.")

    def processes(self) -> dict:
        return {"bus": self.where.get("bus", {}).get("pid"),
                "roles": {name: w["pid"] for name, w in self.where.items() if name != "bus"},
                "nodes": {name: w["node"] for name, w in self.where.items()},
                "ray_namespace": self.namespace, "ray_temp_dir": self.temp_dir}

    # ------------------------------------------------------------------ shut down
    def stop(self, shutdown_seconds: float, warn: Callable[[str], None]) -> None:
        if not ray.is_initialized():
            return
        actors = {f"{r}-{i}": handle for (r, i), handle in self.handles.items()}
        actors["bus"] = self.bus
        stops = {name: a.stop.remote() for name, a in actors.items()}
        _, left = ray.wait(list(stops.values()), num_returns=len(stops), timeout=shutdown_seconds)
        time.sleep(LOG_DRAIN_S)
        for name, actor in actors.items():
            if stops[name] in left and name in self.where:  # one never placed cannot answer: no news
                warn(f"{name} did not answer stop in {shutdown_seconds}s: killed")
            ray.kill(actor)
        if self.pg is not None:
            remove_placement_group(self.pg)
        ray.kill(self.registry)
        self.service.close()
        ray.shutdown()  # a private cluster stops with it; a joined one only loses this driver


def _watch(ref, name: str, on_exit: Callable[[str, str | None], None]) -> None:
    """Call ``on_exit(what, detail)`` when the remote call ``ref`` ends, however it ends."""
    def watch() -> None:
        try:
            code = ray.get(ref)
            on_exit(f"exited with code {code}", None)
        except ray.exceptions.RayActorError as e:
            on_exit("died", f"Ray lost the actor: {_first_line(e)}")
        except Exception as e:  # the driver is shutting down, or Ray failed in a way worth showing
            on_exit("ended", f"{type(e).__name__}: {_first_line(e)}")

    threading.Thread(target=watch, name=f"rlflow-watch-{name}", daemon=True).start()


def _could_not_start(name: str, e: BaseException) -> str:
    return (f"{name} could not start on the Ray cluster: {_first_line(e)}. On a cluster, rlflow (and your reward "
            f"or engine modules) must be importable on every node: install it there or set ray.runtime_env, "
            f"e.g. ray.runtime_env={{working_dir: .}}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
