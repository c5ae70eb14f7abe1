"""Weight sync end to end (sync/weights.py): keyframes, refusals, resyncs, and replicas that die mid-transfer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from rlflow.sync.codec import checksum
from rlflow.sync.config import relay_parent
from rlflow.sync.weights import (ShardedWeightReceiver, SyncConfig, WeightPublisher, WeightReceiver, patches_in_place,
                                  root_checksum)
from rlflow.transfer.channel import ChannelKey
from helpers import CHANNEL_SECRET

KEY = ChannelKey(CHANNEL_SECRET)


class TensorEngine:
    """The smallest rollout engine the sync needs: a version and its live tensors (no generation)."""

    def __init__(self, shapes: dict[str, tuple], dtype=torch.float32):
        self.version = 0
        self.weights = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.weights


def trainer_weights(seed: int, n: int = 50_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(n // 100, 100, generator=g) * 0.02, "b.bias": torch.randn(n // 10, generator=g)}


def step(weights: dict[str, torch.Tensor], seed: int, lr: float = 1e-4) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in weights.values():
        t.add_(torch.randn(t.shape, generator=g).sign() * lr)


def shapes(weights) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in weights.items()}


@pytest.fixture
def address(short_dir):
    return f"ipc://{short_dir}/w"


def test_a_late_joiner_gets_the_keyframe_and_then_the_patches_after_it(address):
    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(keyframe_ratio=100.0), torch.bfloat16, key=KEY)
    for v in range(4):
        step(w, v)
        pub.publish(v, w)
    rx, engine = WeightReceiver(address, SyncConfig(), key=KEY), TensorEngine(shapes(w), torch.bfloat16)
    try:
        reports = rx.update(engine, need=3, timeout=10)
        assert [r["object"] for r in reports] == ["full-0", "patch-1", "patch-2", "patch-3"]
        assert engine.version == 3 and checksum(engine.weights) == pub.encoder.checksum
    finally:
        rx.close()
        pub.close()


def test_a_new_keyframe_is_cut_once_patches_add_up_to_one_and_old_objects_are_dropped(address):
    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(keyframe_ratio=1.0), torch.float32, key=KEY)
    try:
        pub.publish(0, w)
        cuts = []
        for v in range(1, 6):
            step(w, v, lr=1.0)  # every element changes: each patch is as big as a snapshot
            cuts.append(pub.publish(v, w)["sync/keyframe"])
        head = pub.channel.store.head
        assert sum(cuts) >= 2 and head.meta["keyframe"] == max(v for v, c in zip(range(1, 6), cuts) if c)
        assert len(head.objects) <= 3  # the keyframe, and at most a patch or two since
    finally:
        pub.close()


def test_a_patch_from_another_lineage_is_refused_and_the_replica_resyncs_from_the_keyframe(address):
    first = WeightPublisher(address, SyncConfig(), torch.float32, key=KEY)
    w = trainer_weights(0)
    first.publish(0, w)
    step(w, 1)
    first.publish(1, w)
    rx, engine = WeightReceiver(address, SyncConfig(), head_poll=0.5, key=KEY), TensorEngine(shapes(w))
    try:
        rx.update(engine, need=1, timeout=10)
        first.close()  # the trainer restarts from other weights and republishes the same version numbers
        second = WeightPublisher(address, SyncConfig(), torch.float32, key=KEY)
        w2 = trainer_weights(7)
        for v in range(3):
            step(w2, 10 + v)
            second.publish(v, w2)
        reports = rx.update(engine, need=2, timeout=30)
        assert reports[0]["object"] == "patch-2" and "another lineage" in reports[0]["error"]
        assert reports[1]["object"].startswith("full-") and all(r["bit_exact"] for r in reports[1:])
        assert rx.version == 2 and checksum(engine.weights) == second.encoder.checksum
        second.close()
    finally:
        rx.close()


def test_weights_corrupted_in_a_replica_fail_the_checksum_and_are_replaced_from_the_keyframe(address):
    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(), torch.float32, key=KEY)
    rx, engine = WeightReceiver(address, SyncConfig(), key=KEY), TensorEngine(shapes(w))
    try:
        pub.publish(0, w)
        rx.update(engine, need=0, timeout=10)
        engine.weights["b.bias"][3] += 1.0  # a bit flip in the replica's memory, not in transit
        w["a.weight"][0, :5] += 0.1  # a sparse patch, which leaves b.bias alone
        pub.publish(1, w)
        reports = rx.update(engine, need=1, timeout=10)
        assert reports[0]["object"] == "patch-1" and "fail their checksum" in reports[0]["error"]
        assert reports[1]["object"].startswith("full-") and all(r["bit_exact"] for r in reports[1:])
        assert checksum(engine.weights) == pub.encoder.checksum and rx.version == 1
    finally:
        rx.close()
        pub.close()


def test_without_in_place_tensors_the_engine_gets_whole_verified_weights(address):
    class LoadOnly:
        def __init__(self):
            self.version, self.loaded = 0, None

        def load_weights(self, weights, version):
            self.loaded, self.version = {k: v.clone() for k, v in weights.items()}, version

    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(), torch.bfloat16, key=KEY)
    rx, engine = WeightReceiver(address, SyncConfig(), key=KEY), LoadOnly()
    try:
        for v in range(3):
            step(w, v)
            pub.publish(v, w)
            rx.update(engine, need=v, timeout=10)
            assert engine.version == v and checksum(engine.loaded) == pub.encoder.checksum
    finally:
        rx.close()
        pub.close()


def test_attacker_weights_pushed_by_a_fake_upstream_never_reach_the_engine(address, short_dir):
    """The attack a relay once fell to: its upstream peer answered with a head of its own (version 2,
    listing attacker bytes) and the replica applied it. Heads now come only from the actor, signed."""
    import xxhash

    from fuzz import pushing_heads
    from rlflow.sync.codec import PatchEncoder
    from rlflow.transfer.channel import Head, ObjectInfo

    attacker = PatchEncoder(torch.float32).snapshot(2, {k: torch.full_like(v, 6.66) for k, v in trainer_weights(0).items()})
    forged = Head(2, {"keyframe": 2, "chain": [], "time": time.time(), "checksum": "attacker"},
                  {"full-2": ObjectInfo(len(attacker), [xxhash.xxh3_64_hexdigest(attacker)])})
    forged.sig = ChannelKey(os.urandom(32)).sign(forged.to_json())
    stop = threading.Event()  # whatever the replica asks the peer for, it answers with the attacker's snapshot
    attack = threading.Thread(target=pushing_heads, args=(f"ipc://{short_dir}/evil", forged.to_json(), attacker, stop),
                              daemon=True)
    attack.start()
    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(), torch.float32, key=KEY)
    rx, engine = WeightReceiver(address, SyncConfig(hop_timeout=1.0), upstream=f"ipc://{short_dir}/evil", key=KEY), TensorEngine(shapes(w))
    try:
        for v in range(2):
            step(w, v)
            pub.publish(v, w)
            reports = rx.update(engine, need=v, timeout=30)
            assert all(r["bit_exact"] for r in reports)
        assert rx.version == engine.version == 1 and checksum(engine.weights) == pub.encoder.checksum
        assert rx.update(engine) == [] and rx.relay.store.head.version == 1  # head 2 was never adopted
        assert rx.stats["from_upstream"] == 0 and rx.stats["corrupt_chunks"] >= 1  # every byte came from the actor
    finally:
        stop.set()
        attack.join(5)
        rx.close()
        pub.close()


def test_weights_that_verify_against_their_blob_but_not_the_signed_head_are_refused(address):
    """A blob checks itself; the head the actor signed names the weights it published: both must agree."""
    from rlflow.sync.codec import PatchEncoder
    from rlflow.transfer.channel import Publisher

    w = trainer_weights(0)
    blob = PatchEncoder(torch.float32).snapshot(0, w)
    pub = Publisher(address, key=KEY)
    rx, engine = WeightReceiver(address, SyncConfig(), key=KEY), TensorEngine(shapes(w))
    try:
        pub.publish(0, {"full-0": blob}, meta={"keyframe": 0, "chain": [], "time": time.time(),
                                              "checksum": checksum({k: v + 1 for k, v in w.items()})})
        with pytest.raises(RuntimeError, match="failed to verify"):
            rx.update(engine, need=0, timeout=10)
        assert rx.version is None  # never generates with them
    finally:
        rx.close()
        pub.close()


def test_relay_topologies_are_a_chain_a_tree_or_direct():
    assert [relay_parent(r, 1) for r in range(4)] == [None, 0, 1, 2]
    assert [relay_parent(r, 2) for r in range(6)] == [None, None, 0, 0, 1, 1]
    assert [relay_parent(r, 0) for r in range(3)] == [None, None, None]


# ---------------------------------------------------------------- a replica process killed mid-transfer
SLOW = SyncConfig(chunk_kb=64, uplink_mb_s=2.0, hop_timeout=1.0)  # a 2 MB snapshot takes ~1 s per hop


def _replica_process(address: str, serve: str, shapes_: dict, out) -> None:
    rx, engine = WeightReceiver(address, SLOW, None, serve, key=KEY), TensorEngine(shapes_)
    while True:
        rx.update(engine, need=-1 if rx.version is None else rx.version + 1, timeout=120)
        out.put((rx.version, checksum(engine.weights)))


def test_a_replica_killed_mid_transfer_and_restarted_catches_up_while_its_peer_is_served(address, short_dir):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    w = trainer_weights(0, n=500_000)  # 2 MB of float32
    pub = WeightPublisher(address, SLOW, torch.float32, key=KEY)
    serve = f"ipc://{short_dir}/w-0"
    first = ctx.Process(target=_replica_process, args=(address, serve, shapes(w), out), daemon=True)
    first.start()
    peer, engine = WeightReceiver(address, SLOW, upstream=serve, key=KEY), TensorEngine(shapes(w))
    restarted = None
    try:
        pub.publish(0, w)
        synced = threading.Thread(target=peer.update, args=(engine, 0, 60))
        synced.start()
        deadline = time.monotonic() + 30
        while not 0 < peer.relay.store.missing.get("full-0", 0) < 24:  # some of its 32 chunks came via the peer
            assert time.monotonic() < deadline, "the peer never started receiving from replica 0"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        synced.join(60)
        assert engine.version == 0 and checksum(engine.weights) == pub.encoder.checksum
        assert peer.stats["upstream_failures"] >= 1 and peer.stats["from_root"] > 0
        for v in (1, 2):
            step(w, v, lr=1e-3)
            pub.publish(v, w)
        restarted = ctx.Process(target=_replica_process, args=(address, serve, shapes(w), out), daemon=True)
        restarted.start()
        deadline = time.monotonic() + 60
        while True:
            version, digest = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if version == 2:
                break
        assert digest == pub.encoder.checksum  # the restarted replica caught up, bit for bit
        peer.update(engine, need=2, timeout=30)
        assert checksum(engine.weights) == pub.encoder.checksum
    finally:
        peer.close()
        for p in (first, restarted):
            if p is not None and p.is_alive():
                p.kill()
        pub.close()


class HookedEngine(TensorEngine):
    """A user's subclass of an engine with ``tensors()`` that overrides ``load_weights`` (to log each version)."""

    def __init__(self, shapes, dtype=torch.float32):
        super().__init__(shapes, dtype)
        self.loaded: list[int] = []

    def load_weights(self, weights, version):
        for k, v in weights.items():
            self.weights[k].copy_(v)
        self.version = version
        self.loaded.append(version)


def test_a_subclass_overriding_load_weights_gets_every_version_through_it(address):
    from rlflow.engines.hf import HFRolloutEngine

    assert patches_in_place(TensorEngine) and patches_in_place(HFRolloutEngine)
    assert not patches_in_place(HookedEngine)
    assert not patches_in_place(type("MyHF", (HFRolloutEngine,), {"load_weights": lambda self, w, v: None}))
    w = trainer_weights(0)
    pub = WeightPublisher(address, SyncConfig(), torch.float32, key=KEY)
    rx, engine = WeightReceiver(address, SyncConfig(), key=KEY), HookedEngine(shapes(w))
    try:
        pub.publish(0, w)
        rx.update(engine, need=0, timeout=10)
        step(w, 1)
        pub.publish(1, w)
        rx.update(engine, need=1, timeout=10)
        assert engine.loaded == [0, 1] and engine.version == 1
        assert checksum(engine.weights) == pub.encoder.checksum  # bit-exact through the override
    finally:
        rx.close()
        pub.close()


class Ranks:
    """Trainer ranks of a sharded model in one process: each publishes its rows of every tensor (dim 0,
    split as FSDP2 splits it) on its own channel, agreeing on keyframes and the root as the actor does
    (roles/actor.ShardedPublication, without the process group: the agreement is computed here)."""

    def __init__(self, addresses: list[str], dtype=torch.float32):
        self.pubs = [WeightPublisher(a, SyncConfig(keyframe_ratio=1.0), dtype, key=KEY) for a in addresses]
        self.dtype = dtype

    def publish(self, version: int, weights: dict[str, torch.Tensor], root: str | None = None) -> None:
        n = len(self.pubs)
        parts = []
        for r, pub in enumerate(self.pubs):
            rows = {}
            for name, t in weights.items():
                size = -(-t.shape[0] // n)
                start, stop = min(r * size, t.shape[0]), min((r + 1) * size, t.shape[0])
                if stop > start:
                    rows[name] = [start, stop]
            parts.append((pub.encode(version, {k: weights[k][a:b] for k, (a, b) in rows.items()}), rows))
        agreed_root = root or root_checksum([p["checksum"] for p, _ in parts])
        keyframe = any(p["wants_keyframe"] for p, _ in parts)
        for r, (pub, (pending, rows)) in enumerate(zip(self.pubs, parts)):
            pub.send(pending, keyframe, {"shard": r, "shards": n, "rows": rows, "shapes": shapes(weights),
                                         "dtype": str(self.dtype).removeprefix("torch."), "root": agreed_root})

    def close(self) -> None:
        for pub in self.pubs:
            pub.close()


def test_shards_published_by_each_rank_assemble_bit_exact_weights_on_the_rollout(short_dir):
    addresses = [f"ipc://{short_dir}/w{r}" for r in range(3)]
    w = trainer_weights(0, n=30_100)  # 301 rows and 3010 elements: uneven splits over 3 ranks
    ranks = Ranks(addresses, torch.bfloat16)
    rx = ShardedWeightReceiver(addresses, SyncConfig(), [None] * 3, [None] * 3, key=KEY)
    engine = TensorEngine(shapes(w), torch.bfloat16)
    applied = []
    try:
        for v in range(6):  # the first is a keyframe; patches after, and a keyframe when they add up
            step(w, v, lr=1e-2)
            ranks.publish(v, w)
            reports = rx.update(engine, need=v, timeout=10)
            assert rx.version == engine.version == v and all(r["bit_exact"] == 1 for r in reports)
            assert checksum(engine.weights) == checksum({k: t.to(torch.bfloat16) for k, t in w.items()})
            applied += [r["object"] for r in reports]
        assert {o.split("-")[0] for o in applied} == {"full", "patch"} and len(applied) == 3 * 6  # 3 shards
    finally:
        rx.close()
        ranks.close()


def test_shards_that_do_not_make_the_published_root_are_refused_and_never_serve_a_version(short_dir):
    addresses = [f"ipc://{short_dir}/w{r}" for r in range(2)]
    w = trainer_weights(1)
    ranks = Ranks(addresses)
    rx = ShardedWeightReceiver(addresses, SyncConfig(), [None, None], [None, None], key=KEY)
    engine = TensorEngine(shapes(w))
    try:
        ranks.publish(0, w, root="0" * 32)  # every shard verifies alone, but they do not make this root
        with pytest.raises(RuntimeError, match="failed to verify"):
            rx.update(engine, need=0, timeout=5)
        assert rx.version is None and engine.version == 0  # never took the version
        step(w, 1)
        ranks.publish(1, w)  # a right root: taken from the keyframe of every shard
        rx.update(engine, need=1, timeout=10)
        assert rx.version == 1 and checksum(engine.weights) == checksum(w)
    finally:
        rx.close()
        ranks.close()


def test_one_process_serves_several_curve_channels_each_with_its_own_authenticator(tmp_path):
    """A rollout relaying every trainer rank's shard serves several channels beyond loopback; CURVE's ZAP
    handler is one per ZeroMQ context, so each channel node has a context of its own (and ends it)."""
    from rlflow.transfer.security import keygen

    keys = str(keygen(tmp_path / "keys"))
    w = trainer_weights(2, n=1000)
    pubs = [WeightPublisher("tcp://*:0", SyncConfig(), torch.float32, keys, key=KEY) for _ in range(2)]
    try:
        pubs[0].publish(0, w)
        pubs[1].publish(0, {k: t * 2 for k, t in w.items()})
        for pub, factor in zip(pubs, (1, 2)):
            address = pub.address.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
            rx, engine = WeightReceiver(address, SyncConfig(), keys_dir=keys, key=KEY), TensorEngine(shapes(w))
            try:
                rx.update(engine, need=0, timeout=10)
                assert checksum(engine.weights) == checksum({k: t * factor for k, t in w.items()})
            finally:
                rx.close()
    finally:
        for pub in pubs:
            pub.close()
