"""How role processes find each other's sockets: a name per endpoint, resolved by the launcher's way.

Endpoints are named (``weights``: the actor's weight channel; ``weights-3``: rollout replica 3's relay).
A role that listens calls ``bind_address(name)``, binds there, then ``advertise(name, bound)`` with the
address it really got; a role that connects calls ``lookup(name, timeout)``.

- ``LocalEndpoints`` (one machine): a role binds an ipc path in the run's socket directory and advertises
  what it bound (or any other address, such as a server's URL) as a file beside it; lookups wait for
  that file, bounded by their timeout, so a name exists only once its owner is listening.
- ``RayEndpoints`` (a cluster): a role binds tcp on its node's IP with a port the OS picks, and advertises
  the result in the run's registry (a named Ray actor); lookups poll the registry, bounded by their
  timeout, and the error names the endpoint and who should have published it.

Only addresses travel through Ray; the data still flows over our own sockets. The spec is a plain dict
so it crosses process boundaries (multiprocessing spawn, Ray actor arguments) unchanged.
"""

from __future__ import annotations

import os
import time

LOOKUP_POLL_S = 0.2  # between registry polls: endpoints appear once, within seconds of a role starting


class LocalEndpoints:
    def __init__(self, sock_dir: str):
        self.sock_dir = sock_dir

    def bind_address(self, name: str) -> str:
        return f"ipc://{self.sock_dir}/{name}"

    def advertise(self, name: str, address: str) -> None:
        path = os.path.join(self.sock_dir, f"{name}.endpoint")
        with open(path + ".tmp", "w") as f:
            f.write(address)
        os.replace(path + ".tmp", path)  # atomic: a reader sees the whole address or nothing

    def withdraw(self, name: str) -> None:
        """Forget ``name`` (its owner is gone and a successor will advertise anew): its address file, and
        the socket or rendezvous file bound at ``bind_address(name)``."""
        for path in (os.path.join(self.sock_dir, f"{name}.endpoint"), os.path.join(self.sock_dir, name)):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def lookup(self, name: str, timeout: float) -> str:
        path, deadline = os.path.join(self.sock_dir, f"{name}.endpoint"), time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for endpoint {name!r}: {describe(name)} has not "
                                   f"published its address; did it start?")
            time.sleep(LOOKUP_POLL_S)
        with open(path) as f:
            return f.read()


class RayEndpoints:
    def __init__(self, registry: str, namespace: str, host: str | None = None):
        self.registry_name, self.namespace, self.host = registry, namespace, host
        self._registry = None

    @property
    def registry(self):
        if self._registry is None:
            import ray

            self._registry = ray.get_actor(self.registry_name, namespace=self.namespace)
        return self._registry

    def bind_address(self, name: str) -> str:
        import ray

        return f"tcp://{self.host or ray.util.get_node_ip_address()}:0"

    def advertise(self, name: str, address: str) -> None:
        import ray

        ray.get(self.registry.put.remote(name, address), timeout=60)

    def withdraw(self, name: str) -> None:
        """Forget ``name`` (its owner is gone and a successor will advertise anew)."""
        import ray

        ray.get(self.registry.delete.remote(name), timeout=60)

    def lookup(self, name: str, timeout: float) -> str:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            address = ray.get(self.registry.get.remote(name), timeout=60)
            if address is not None:
                return address
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for endpoint {name!r} in the run's registry: "
                                   f"{describe(name)} has not published its address; did it start?")
            time.sleep(LOOKUP_POLL_S)


def describe(name: str) -> str:
    """Which role publishes endpoint ``name`` (for error messages)."""
    base, _, shard = name.partition(".")  # a sharded trainer's rank ``shard`` (roles/context.shard_endpoint)
    of = f" of trainer rank {shard}'s rows" if shard else ""
    if base == "weights":
        return "the actor (its weight channel)" if not shard else f"trainer rank {shard} (its weight channel)"
    if base.startswith("weights-"):
        return f"rollout replica {base.split('-', 1)[1]} (its weight relay{of})"
    if name.startswith("sglang-"):
        return f"rollout replica {name.split('-', 1)[1]} (its sglang server)"
    if name == "trainer":
        return "trainer replica 0 (the data-parallel rendezvous)"
    return f"whoever serves {name!r}"


def make_endpoints(spec: dict):
    """The Endpoints a spec describes: {"kind": "local", "sock_dir"} or {"kind": "ray", "registry", "namespace"}."""
    if spec["kind"] == "local":
        return LocalEndpoints(spec["sock_dir"])
    if spec["kind"] == "ray":
        return RayEndpoints(spec["registry"], spec["namespace"], spec.get("host"))
    raise ValueError(f"unknown endpoints kind {spec['kind']!r}")
