"""Under Ray, no secret rides in an actor's arguments: plans ship without them, and each actor fetches
its own from the launcher's credential service with a keypair it made itself (flow/placement/credentials.py)."""

from __future__ import annotations

import dataclasses
import pickle
import secrets as random_bytes

import pytest
import zmq

from rlflow.flow.config import RunConfig
from rlflow.flow.launcher import plan_roles
from rlflow.flow.placement import credentials
from rlflow.flow.placement.plan import Wiring
from rlflow.roles import schema
from rlflow.transfer import ServerConfig
from rlflow.transfer.security import keygen, load_keys, unpin


def _plans(tmp_path):
    cfg = RunConfig()
    cfg.rollout.engine, cfg.rollout.sglang.update = "sglang", "distributed"  # the case with a shipped server key
    wiring = Wiring(bus="tcp://10.0.0.1:1", control="tcp://10.0.0.1:2", endpoints={}, keys=None, model_path="m",
                    run_dir="r", seed=0, wait_seconds=5, lease_seconds=5, steps=3, heartbeat_s=1, launcher_pid=1)
    channel = random_bytes.token_bytes(32)
    return [p.replace(wiring=wiring, bus_token=random_bytes.token_hex(16),
                      channel_secret=channel if p.role in schema.CHANNEL_ROLES else None) for p in plan_roles(cfg)]


def _secret_strings(plan) -> list[bytes]:
    found = [plan.bus_token.encode()]
    if plan.channel_secret:
        found.append(plan.channel_secret)
    sglang = getattr(plan.config, "sglang", None) or getattr(getattr(plan.args, "broadcast", None), "sglang", None)
    if sglang is not None and sglang.api_key:
        found.append(sglang.api_key.encode())
    return found


def test_a_plan_split_for_ray_carries_no_secret_and_joins_back_whole(tmp_path):
    for plan in _plans(tmp_path):
        public, secrets = credentials.split(plan)
        shipped = pickle.dumps(public)
        assert not [s for s in _secret_strings(plan) if s in shipped], plan.name
        assert credentials.join(public, secrets) == plan


def test_no_curve_secret_is_ever_shipped_to_a_ray_actor(tmp_path):
    """An actor serves and connects with the keypair it made: a plan or bus config carrying CURVE keys
    (the launcher's, whose server key guards the control socket) is refused rather than shipped."""
    keys = load_keys(keygen(tmp_path / "keys"))
    plan = _plans(tmp_path)[0]
    with pytest.raises(ValueError, match="carries no CURVE keys"):
        credentials.split(plan.replace(wiring=dataclasses.replace(plan.wiring, keys=keys)))
    with pytest.raises(ValueError, match="carries no CURVE keys"):
        credentials.split_server(ServerConfig(address="tcp://10.0.0.1:0", keys_dir=keys))


def test_the_bus_config_split_for_ray_carries_no_token(tmp_path):
    grants = {random_bytes.token_hex(16): g for g in schema.grants().values()}
    config = ServerConfig(address="tcp://10.0.0.1:0", grants=grants)
    public, secrets = credentials.split_server(config)
    shipped = pickle.dumps(public)
    assert not [t for t in grants if t.encode() in shipped]
    assert credentials.join_server(public, secrets) == config


def test_only_the_admitted_key_fetches_its_secrets_and_only_once():
    service = credentials.CredentialService("127.0.0.1")
    try:
        mine, stranger = zmq.curve_keypair(), zmq.curve_keypair()
        service.admit(mine[0].decode(), {"bus_token": "t" * 32})
        with pytest.raises(TimeoutError, match="credentials from the launcher"):
            credentials.fetch(service.where, stranger, timeout=1.5)  # its handshake is refused: it reads nothing
        assert credentials.fetch(service.where, mine, timeout=10) == {"bus_token": "t" * 32}
        with pytest.raises(TimeoutError):  # fetched once: the key is no longer admitted
            credentials.fetch(service.where, mine, timeout=1.5)
        assert service.served == 1 and not service.pending
    finally:
        service.close()


def test_a_key_admitted_after_its_replica_started_asking_still_gets_its_secrets():
    import threading

    service = credentials.CredentialService("127.0.0.1")
    try:
        mine = zmq.curve_keypair()
        threading.Timer(2.0, service.admit, args=(mine[0].decode(), {"x": 1})).start()  # Ray hands the key over late
        assert credentials.fetch(service.where, mine, timeout=20) == {"x": 1}
    finally:
        service.close()


def test_under_ray_each_process_connects_with_its_own_key_and_only_registered_keys_get_in():
    """The run's servers accept a client key only while the launcher has it registered for a process of
    the run (``RunKeys``, looked up in the run's registry at each handshake); a killed replica's key is
    deleted with it. Each process's keypair is its own, as a client and as a server: the bus serves with
    its actor's, and its address names that key."""
    import socket
    import uuid

    import ray

    from rlflow.flow.placement.ray_cluster import REGISTRY, Registry, own_keys
    from rlflow.transfer import BusClient, BusTimeout
    from rlflow.transfer.server import serve_in_thread

    namespace = f"rlflow-test-{uuid.uuid4().hex[:8]}"
    ray.init(address="local", namespace=namespace, num_cpus=1, include_dashboard=False, logging_level="ERROR")
    server = None
    try:
        registry = ray.remote(Registry).options(name=REGISTRY).remote()
        mine, stranger, bus_pair = zmq.curve_keypair(), zmq.curve_keypair(), zmq.curve_keypair()
        ray.get(registry.put.remote(f"curve/{mine[0].decode()}", "rollout-0"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The bus as the bus actor runs it: its own keypair, the registry deciding who gets in.
        bus, _ = serve_in_thread(ServerConfig(address=f"tcp://127.0.0.1:{port}", keys_dir=own_keys(bus_pair, namespace)))
        server = bus
        assert unpin(bus.address)[1] == bus_pair[0]
        with BusClient(bus.address, keys_dir=own_keys(mine, namespace), connect_timeout=10) as c:
            assert c.stats()["rows"] == 0
        with pytest.raises(BusTimeout):
            BusClient(bus.address, keys_dir=own_keys(stranger, namespace), connect_timeout=1.5)
        with pytest.raises(ValueError, match="names no CURVE server key"):  # an actor knows no run-wide server key
            BusClient(unpin(bus.address)[0], keys_dir=own_keys(mine, namespace), connect_timeout=1.5)
        ray.get(registry.delete.remote(f"curve/{mine[0].decode()}"))
        fresh = own_keys(mine, namespace)
        assert fresh.authorized.callback("*", mine[0]) is False  # a new lookup: the key is gone
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
