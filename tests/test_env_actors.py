"""Environment workers as Ray actors (ray.env.actors=true): the pool's protocol over tcp and CURVE, keys per actor."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import zmq  # noqa: E402

from helpers import metrics, rlflow  # noqa: E402
from rlflow.envs.config import EnvConfig  # noqa: E402
from rlflow.envs.pool import EnvPool  # noqa: E402
from rlflow.transfer.security import CurveKeys, connect  # noqa: E402
from test_episodes import _run_episode  # noqa: E402
from test_scale_out import assert_no_ray_cluster_left  # noqa: E402

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def private_cluster():
    """A Ray cluster of this test process's own (address="local": never someone else's)."""
    temp = tempfile.mkdtemp(prefix="rlr-")
    path = os.pathsep.join(filter(None, [TESTS, str(Path(TESTS).parent), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=100 << 20, _temp_dir=temp,
             logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _intruder(pool: EnvPool, keys: CurveKeys, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    connect(sock, pool.address, keys)
    return sock


def test_worker_actors_run_episodes_and_the_pool_hears_only_its_own_actors_each_under_its_own_key(private_cluster):
    """Episodes run in actors (their environment sees Ray loaded). A stranger's key gets nothing through;
    a key the pool admitted, sending as another worker, is dropped and counted; an actor that dies costs
    its episode, and a fresh actor takes its place."""
    from rlflow.flow.placement.ray_env import RayEnvWorkers

    workers = RayEnvWorkers({"num_cpus": 0.5, "num_gpus": 0, "resources": None}, CurveKeys(*zmq.curve_keypair()))
    pool = EnvPool(EnvConfig(cls="user_envs.FlakyEnv", workers=2, step_timeout_s=10, start_timeout_s=60), workers)
    try:
        assert pool.address.startswith("tcp://") and "?curve=" in pool.address
        # A key the pool admitted, speaking as another worker (one whose actor is still starting: a connected
        # worker's identity cannot be taken over at all), is dropped and counted.
        public, secret = zmq.curve_keypair()
        workers.admit(public)  # as if one of the pool's own actors went rogue
        impostor = _intruder(pool, CurveKeys(public, secret), b"w1.2")
        impostor.send_json({"op": "hello", "token": ""})
        deadline = time.monotonic() + 10
        while pool.stats["bad_messages"] == 0 and time.monotonic() < deadline:
            assert pool.poll(0.05) == []
        impostor.close(0)
        workers.forget(public)
        assert pool.stats["bad_messages"] == 1 and not pool.workers[b"w1.2"].ready
        stranger = _intruder(pool, CurveKeys(*zmq.curve_keypair()), b"w9.9")
        stranger.send_json({"op": "hello", "token": ""})
        outs = _run_episode(pool, "e0", {"behaviour": "ok"}, ["a", "b", "c"], timeout=60)
        assert outs[-1].step.done and outs[-1].step.info == {"turn": 1.0, "ray": 1.0}
        assert pool.stats["bad_messages"] == 1  # the stranger was refused at the handshake: nothing came through
        stranger.close(0)
        outs = _run_episode(pool, "e1", {"behaviour": "die"}, ["a"], timeout=60)
        assert outs[-1].failure == "env_died" and "Ray lost its actor" in outs[-1].error
        outs = _run_episode(pool, "e2", {"behaviour": "ok"}, ["a", "b", "c"], timeout=60)
        assert outs[-1].step.done and pool.stats["restarts"] == 1
    finally:
        pool.shutdown()


def test_under_ray_a_run_s_environment_workers_are_actors_and_every_sample_is_accounted_for(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "launcher=ray", "ray.env.actors=true", "ray.env.cpus=0.5", "data.task=reverse",
               "rollout.group_size=4", "actor.groups_per_step=4", "rollout.max_new_tokens=4",
               "env.cls=user_envs.FlakyEnv", "+env.kwargs.behaviour=ok", "env.max_turns=3", "env.workers=4",
               "flow.steps=3")  # failures under Ray: the test above
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["env/ray"] == m["env/turn"] > 0 for m in rows)  # every step of every episode ran in an actor
    samples = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert samples["consumed_more_than_once"] == samples["issued_not_consumed"] == samples["consumed_not_issued"] == 0
    assert_no_ray_cluster_left(run_dir)
