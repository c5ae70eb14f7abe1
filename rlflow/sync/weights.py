"""Weight sync: the actor publishes each policy version as a sparse patch; rollouts apply it bit for bit.

    key = ChannelKey(secret)                                          # the run's, shared by actor and rollouts
    actor:    pub = WeightPublisher(address, SyncConfig(), torch.bfloat16, key=key)
              stats = pub.publish(version, engine.weights())        # patch (base -> version), maybe a keyframe
    rollout:  rx = WeightReceiver(address, SyncConfig(), upstream=None, serve="ipc://.../w-0", key=key)
              reports = rx.update(engine, need=version, timeout=600) # scatter in place, verify, or resync

What the channel holds (``transfer/channel.py``; only what the newest head lists is kept):
- ``full-K``: a full snapshot (the keyframe) of version K; ``patch-v``: the patch v - 1 -> v for every
  version since K (``meta.chain``). A new keyframe is cut once the patches since the last one add up to
  ``keyframe_ratio`` of its size, so a replica that joins late, restarts or falls behind catches up with
  at most about (1 + keyframe_ratio) snapshots of bytes, and the channel's memory stays bounded.
- Patches are prefetched by every replica as soon as announced (and relayed down the chain/tree);
  keyframes travel only to replicas that ask for them.

A replica's state is ``version``: the version its tensors hold *and verified* (checksum equal to the
actor's), or None. Anything else (first sync, a patch for another base, a corrupted object, a failed
checksum) leads to the keyframe: ``version`` is None until a snapshot verifies, and a rollout only
generates at a verified version, so a half-applied patch never serves generation.

A sharded trainer (``actor.parallel=fsdp``) publishes a channel per rank, each with that rank's rows
(``WeightPublisher.encode`` and ``send``, split so the ranks agree on keyframes and the root checksum in
between: ``roles/actor.ShardedPublication``); ``ShardedWeightReceiver`` assembles them (see its docstring).

Authenticity: the channel is keyed (``transfer/channel.ChannelKey``, one per run). Every head is signed
by the actor and lists each chunk's checksum; its ``meta.checksum`` is the checksum of the weights at
the head's version. A replica believes only signed heads, checks every chunk against them whichever
peer relayed it, and after applying a head's objects compares its tensors' checksum with
``meta.checksum``: weights no key holder published never serve generation, even when a peer forges a
whole blob with a consistent checksum inside.
"""

from __future__ import annotations

import time

import torch

from rlflow.sync import codec as sparse
from rlflow.sync.config import SyncConfig
from rlflow.transfer.channel import ChannelKey, Gone, Publisher
from rlflow.transfer.relay import HEAD_POLL_S, Relay
from rlflow.transfer.wire import BusTimeout

MAX_RESYNCS = 3  # full snapshots that may fail in a row before the replica gives up with an error


class WeightPublisher:
    """The actor's side: a patch per version, a keyframe now and then, all on one channel."""

    def __init__(self, address: str, cfg: SyncConfig, dtype: torch.dtype, keys_dir: str | None = None, *,
                 key: ChannelKey):
        """``keys_dir``: CURVE keys, required when ``address`` is beyond loopback (transfer/security.py);
        ``key``: the run's channel key (only its holders read; every head is signed with it)."""
        self.cfg = cfg
        self.channel = Publisher(address, chunk_bytes=cfg.chunk_kb << 10, uplink_bytes_per_s=cfg.uplink_mb_s * 1e6,
                                 keys_dir=keys_dir, key=_required(key))
        self.address = self.channel.address
        self.encoder = sparse.PatchEncoder(dtype, cfg.compress, cfg.values)
        self.keyframe: int | None = None
        self.keyframe_bytes = 0
        self.chain: list[int] = []  # versions since the keyframe with a patch on the channel
        self.since_keyframe = 0  # bytes of those patches

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> dict:
        """Publish ``weights`` as ``version``; returns the ``sync/*`` metrics of this publication."""
        return self.send(self.encode(version, weights), None)

    def encode(self, version: int, weights: dict[str, torch.Tensor]) -> dict:
        """Diff ``weights`` against the last version (or take the first snapshot): the first half of
        ``publish``, for publishers that agree on keyframes before sending (a sharded trainer's ranks).
        Returns the pending publication: its metrics so far and ``wants_keyframe``."""
        t0 = time.perf_counter()
        objects, stats = {}, {}
        if self.keyframe is not None and self.cfg.sparse:
            objects[f"patch-{version}"], stats = self.encoder.patch(version, weights)
        else:  # no patch to send: this version goes as a snapshot whatever the others decide
            objects[f"full-{version}"] = self.encoder.snapshot(version, weights)
        grown = self.since_keyframe + stats.get("bytes", 0)
        wants = self.keyframe is None or not self.cfg.sparse or grown >= self.cfg.keyframe_ratio * self.keyframe_bytes
        return {"version": version, "objects": objects, "stats": stats, "wants_keyframe": wants,
                "checksum": self.encoder.checksum, "t0": t0}

    def send(self, pending: dict, keyframe: bool | None, meta: dict | None = None) -> dict:
        """Publish what ``encode`` prepared, with a keyframe if ``keyframe`` (None: if it wanted one);
        ``meta`` joins the head's (signed) meta. Returns the ``sync/*`` metrics."""
        version, objects, stats = pending["version"], pending["objects"], pending["stats"]
        if stats:
            self.chain.append(version)
            self.since_keyframe += stats["bytes"]
        if f"full-{version}" in objects or (pending["wants_keyframe"] if keyframe is None else keyframe):
            if f"full-{version}" not in objects:
                objects[f"full-{version}"] = self.encoder.snapshot(version)
            full = objects[f"full-{version}"]
            self.keyframe, self.keyframe_bytes, self.since_keyframe = version, len(full), 0
            self.chain = [version] if stats else []
        keep = [k for k in [f"full-{self.keyframe}", *(f"patch-{v}" for v in self.chain)] if k not in objects]
        self.channel.publish(version, objects, keep=keep,
                             meta={**(meta or {}), "keyframe": self.keyframe, "chain": self.chain, "time": time.time(),
                                   "checksum": self.encoder.checksum},
                             prefetch={f"full-{version}": not self.cfg.sparse})
        dense = self.encoder.dense_bytes
        sent = stats.get("bytes", len(objects.get(f"full-{version}", b"")))
        return {"sync/bytes": sent, "sync/dense_bytes": dense, "sync/density": stats.get("density", 1.0),
                "sync/int32_bytes": stats.get("int32_bytes", dense), "sync/keyframe": int(f"full-{version}" in objects),
                "sync/encode_s": time.perf_counter() - pending["t0"]}

    def close(self) -> None:
        self.channel.close()


def _required(key) -> ChannelKey:
    if not isinstance(key, ChannelKey):
        raise TypeError(f"weight sync needs the run's ChannelKey (key=ChannelKey(secrets.token_bytes(32))), "
                        f"got {type(key).__name__}")
    return key


def _after(version: int | None, need: int | None, short: bool) -> int:
    """The version a head must be newer than: ours, and while waiting for ``need``, need - 1 (an older
    head cannot serve, and applying it only spends time, or a resync if it fails)."""
    after = -1 if version is None else version
    return max(after, need - 1) if short and need is not None else after


def _update(receiver, need: int | None, timeout: float, next_head, apply, waited_for) -> list[dict]:
    """The loop of a receiver's ``update``: take the next head (``next_head(short, deadline)``, None when
    none came), apply it (``apply(head, reports, blocking)``), plan again if it was superseded meanwhile
    (``Gone``), resync after a refusal at most ``MAX_RESYNCS`` times in a row, and return once at ``need``
    (or at once without one). ``waited_for()`` says what a timeout waited for."""
    reports, resyncs, deadline = [], 0, time.monotonic() + timeout
    while True:
        short = need is not None and (receiver.version is None or receiver.version < need)
        head = next_head(short, deadline)
        if head is None:
            if short:
                raise BusTimeout(f"waited {timeout:.0f}s for policy version {need} from {waited_for()}")
            return reports
        before = len(reports)
        try:
            apply(head, reports, short)
        except Gone:  # superseded while fetching: plan again from the newer head
            continue
        if any("error" in r for r in reports[before:]):
            resyncs += 1
            if resyncs > MAX_RESYNCS:
                raise RuntimeError(f"weights failed to verify {resyncs} times in a row; last: {reports[-1]['error']}")
        elif not short or receiver.version >= need:
            return reports


def patches_in_place(engine) -> bool:  # an engine, or its class
    """Whether patches are scattered straight into ``engine.tensors()`` instead of going through its
    ``load_weights``.

    An engine with ``tensors()`` is patched in place, unless its ``load_weights`` comes from a class ahead
    of the one its ``tensors()`` comes from in its MRO (a user's ``class MyEngine(HFRolloutEngine)``, or a
    mixin, adding a hook to ``load_weights``): that override is what the user asked to run, so such an
    engine gets every version through ``load_weights`` from a host copy. An engine that wants both
    in-place patches and its own ``load_weights`` defines ``tensors()`` in the same class too.
    """
    cls = engine if isinstance(engine, type) else type(engine)
    if not hasattr(cls, "tensors"):
        return False
    mro = cls.__mro__
    owner = {name: next((i for i, c in enumerate(mro) if name in vars(c)), None) for name in ("tensors", "load_weights")}
    loads, tensors = owner["load_weights"], owner["tensors"]
    return loads is None or tensors is None or loads >= tensors  # load_weights more specific: call it


class WeightReceiver:
    """A rollout replica's side: a relay node (prefetching, serving peers) and the verified version."""

    def __init__(self, address: str, cfg: SyncConfig, upstream: str | None = None, serve: str | None = None,
                 fetch_timeout: float = 600.0, head_poll: float = HEAD_POLL_S, keys_dir: str | None = None, *,
                 key: ChannelKey):
        """``fetch_timeout``: bound on getting one object's bytes once it is needed; ``head_poll``: see Relay;
        ``keys_dir``: CURVE keys for addresses beyond loopback; ``key``: the run's channel key."""
        self.fetch_timeout = fetch_timeout
        self.relay = Relay(address, upstream, serve, window=cfg.window, hop_timeout=cfg.hop_timeout,
                           uplink_bytes_per_s=cfg.uplink_mb_s * 1e6, head_poll=head_poll, keys_dir=keys_dir,
                           key=_required(key))
        self.version: int | None = None
        self.checksum: str | None = None  # of the weights at ``version``, as verified
        self.shadow: dict[str, torch.Tensor] | None = None  # for engines without in-place tensors

    def update(self, engine, need: int | None = None, timeout: float = 0.0) -> list[dict]:
        """Bring ``engine`` to a version >= ``need``, waiting up to ``timeout`` for the actor to publish it.

        With ``need`` None this never waits: it applies the newest version only if its objects are
        already here (prefetched while the engine generated), so transfers overlap generation.
        Returns one report per object applied (or refused). Raises BusTimeout naming what it waited for.
        """
        def head(short: bool, deadline: float):
            return self.relay.head(_after(self.version, need, short),
                                   max(0.0, deadline - time.monotonic()) if short else 0.0)

        def waited_for() -> str:
            refused = f"; heads refused meanwhile: {self.relay.refused}" if self.relay.refused else ""
            return f"the actor (this replica holds {self.version}): is the actor alive?{refused}"

        return _update(self, need, timeout, head, lambda h, reports, short: self._catch_up(engine, h, reports, short),
                       waited_for)

    def plan(self, head) -> list[str]:
        """The objects that bring this replica from its version to ``head``'s."""
        keyframe, chain = head.meta["keyframe"], head.meta["chain"]
        if self.version is not None and all(v in chain for v in range(self.version + 1, head.version + 1)):
            return [f"patch-{v}" for v in range(self.version + 1, head.version + 1)]
        # first sync, late joiner, or fell behind the keyframe: the snapshot, then the patches after it
        return [f"full-{keyframe}"] + [f"patch-{v}" for v in chain if v > keyframe]

    def ready(self, head) -> bool:
        """Whether every object up to ``head`` is here (asking for the missing ones, so they get fetched)."""
        return all([self.relay.ready(k) for k in self.plan(head)])  # a list: ``ready`` asks for each

    def _catch_up(self, engine, head, reports: list, blocking: bool) -> None:
        keys = self.plan(head)
        if not blocking and not self.ready(head):
            return  # still on its way: generate with the current version, apply next time
        for key in keys:
            t0 = time.monotonic()
            blob = self.relay.fetch(key, self.fetch_timeout)
            t1 = time.monotonic()
            report = {"object": key, "bytes": len(blob), "fetch_wait_s": t1 - t0,
                      "from_actor_bytes": self.relay.stats["from_root"], "from_peers_bytes": self.relay.stats["from_upstream"]}
            if key.endswith(f"-{head.version}"):  # from the actor's publication to the last chunk here
                report["transfer_s"] = self.relay.store.done_at.get(key, time.time()) - head.meta["time"]
            try:
                header = sparse.apply(blob, self._tensors(engine, blob), self.version, self.checksum)
            except sparse.PatchError as e:
                self.version = self.checksum = None  # refused or dirty: only a verified snapshot is trusted now
                reports.append({**report, "bit_exact": 0, "error": str(e)})
                return
            self.version, self.checksum = header["version"], header["checksum"]
            reports.append({**report, "bit_exact": 1, "version": self.version, "apply_s": time.monotonic() - t1})
        if self.version == head.version and self.checksum != head.meta.get("checksum"):
            # Every blob checked itself; the signed head says which weights the actor published.
            reports.append({"object": keys[-1], "bytes": 0, "fetch_wait_s": 0.0, "bit_exact": 0, "from_actor_bytes": self.relay.stats["from_root"],
                            "from_peers_bytes": self.relay.stats["from_upstream"],
                            "error": f"version {head.version} applied to checksum {self.checksum}, but the actor "
                                     f"published {head.meta.get('checksum')}: refused, resyncing"})
            self.version = self.checksum = None
            return
        if self.shadow is not None:  # one whole load after the chain, not one per object
            engine.load_weights(self.shadow, self.version)
        else:
            engine.version = self.version

    def _tensors(self, engine, blob) -> dict[str, torch.Tensor]:
        """The engine's own tensors when it takes patches in place (``patches_in_place``), else a host
        shadow copy that ``load_weights`` then loads whole."""
        if patches_in_place(engine):
            return engine.tensors()
        if self.shadow is None:
            header, _ = sparse.read_header(blob)
            dtype = sparse.DTYPES[header["dtype"]]
            self.shadow = {name: torch.empty(shape, dtype=dtype) for name, shape, *_ in header["tensors"]}
        return self.shadow

    @property
    def stats(self) -> dict:
        return dict(self.relay.stats)

    @property
    def address(self) -> str | None:
        """Where this replica serves its peers (None: it serves none)."""
        return self.relay.address

    def close(self) -> None:
        self.relay.close()



def root_checksum(checksums: list[str]) -> str:
    """One checksum of a sharded model: xxh3-128 over its shards' checksums, in rank order."""
    import xxhash

    return xxhash.xxh3_128("|".join(checksums).encode()).hexdigest()


class _Rows:
    """What one shard's receiver patches in place: the rows of the engine's tensors its trainer rank holds."""

    def __init__(self, tensors: dict[str, torch.Tensor], rows: dict[str, list[int]]):
        self.views = {name: tensors[name][start:stop] for name, (start, stop) in rows.items()}
        self.version = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.views


class ShardedWeightReceiver:
    """A rollout replica's side of a sharded trainer (``actor.parallel=fsdp``): one relay per trainer
    rank's channel, each carrying that rank's rows of every tensor (contiguous rows, so a patch of them
    scatters into a view of the whole tensor with the ordinary codec).

    A version is taken only when every rank has published it (the ranks cut keyframes at the same
    versions): each shard's objects apply to its rows and verify against its own checksum, and the
    replica's version is set only once every shard is there and the root over their checksums equals
    the one every rank's signed head carries. Until then ``version`` stays where it was verified (or None
    after a failure), so generation never sees a mix of versions: a non-blocking update applies nothing
    unless every shard's objects are already here.
    """

    def __init__(self, addresses: list[str], cfg: SyncConfig, upstreams: list[str | None], serves: list[str | None],
                 fetch_timeout: float = 600.0, head_poll: float = HEAD_POLL_S, keys_dir: str | None = None, *,
                 key: ChannelKey):
        self.shards: list[WeightReceiver] = []
        try:
            for address, upstream, serve in zip(addresses, upstreams, serves, strict=True):
                self.shards.append(WeightReceiver(address, cfg, upstream, serve, fetch_timeout, head_poll, keys_dir,
                                                  key=key))
        except BaseException:
            self.close()
            raise
        self.version: int | None = None
        self.shadow: dict[str, torch.Tensor] | None = None  # for engines without in-place tensors

    def update(self, engine, need: int | None = None, timeout: float = 0.0) -> list[dict]:
        """As ``WeightReceiver.update``, over every shard."""
        return _update(self, need, timeout, lambda short, deadline: self._heads(short, deadline, need),
                       lambda heads, reports, short: self._apply(engine, heads, reports, blocking=short),
                       lambda: f"every trainer rank (this replica holds {self.version}): are the ranks alive?")

    def _heads(self, short: bool, deadline: float, need: int | None) -> list | None:
        """Every shard's head at one version newer than ours (waiting while ``short``), or None."""
        after = _after(self.version, need, short)
        heads = [None] * len(self.shards)
        while True:
            target = max((h.version for h in heads if h is not None), default=after + 1)
            for i, rx in enumerate(self.shards):
                if heads[i] is None or heads[i].version < target:
                    heads[i] = rx.relay.head(target - 1, max(0.0, deadline - time.monotonic()) if short else 0.0)
                    if heads[i] is None:
                        return None
            if len({h.version for h in heads}) == 1:
                return heads

    def _apply(self, engine, heads: list, reports: list, blocking: bool) -> None:
        if not blocking and not all([rx.ready(h) for rx, h in zip(self.shards, heads)]):
            return  # some shard's objects are on their way: apply all of them together, later
        version, meta = heads[0].version, heads[0].meta
        tensors = engine.tensors() if patches_in_place(engine) else self._shadow(meta)
        self.version = None  # from here until verified, the weights may mix versions
        start = len(reports)
        for rx, head in zip(self.shards, heads):
            rx._catch_up(_Rows(tensors, head.meta["rows"]), head, reports, blocking=True)
        checksums = [rx.checksum for rx in self.shards]
        if any(rx.version != version for rx in self.shards) or root_checksum(checksums) != meta.get("root"):
            if not any("error" in r for r in reports[start:]):  # a shard's own refusal says it already
                reports.append({"object": f"shards-{version}", "bytes": 0, "fetch_wait_s": 0.0, "bit_exact": 0,
                                "from_actor_bytes": 0, "from_peers_bytes": 0,
                                "error": f"version {version}: the shards' checksums do not make the root the ranks "
                                         f"published ({meta.get('root')}): refused, resyncing every shard"})
            for rx in self.shards:
                rx.version = rx.checksum = None
            return
        self.version = version
        if self.shadow is not None:
            engine.load_weights(self.shadow, version)
        else:
            engine.version = version

    def _shadow(self, meta: dict) -> dict[str, torch.Tensor]:
        if self.shadow is None:
            dtype = sparse.DTYPES[meta["dtype"]]
            self.shadow = {name: torch.empty(shape, dtype=dtype) for name, shape in meta["shapes"].items()}
        return self.shadow

    @property
    def stats(self) -> dict:
        out: dict = {}
        for rx in self.shards:
            for k, v in rx.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def address(self) -> str | None:
        return self.shards[0].address if self.shards else None

    def close(self) -> None:
        for rx in self.shards:
            rx.close()
