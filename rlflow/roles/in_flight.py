"""The rollout's loop under ``rollout.update=in_flight``: continuous generation with in-flight weight updates.

With updates only between calls, a call is a barrier: every group in it waits for the call's longest
response before it is put, and no new weights or prompts enter until then. With long, long-tailed
responses most of the batch sits finished while a few sequences run on. Here the engine never stops:

- between every two decode steps the engine calls ``between(running)``, which applies the newest
  version whose patch has already arrived (the role's ``synced``), renews the leases of the rows
  being generated, and, when at least a quarter of the in-flight target is free, takes more whole
  groups off the bus without waiting and hands their prompts to the engine;
- the engine hands each sequence over as it ends (``finished``), and a group is ready as soon as its last
  sample has ended, so the trainer gets it without waiting for the call's longest. Ready groups are put
  together (``flush``) once a quarter of ``groups_per_call`` is ready or the oldest has waited
  ``LINGER_S``: a put per group would have the reward role score a few samples per call.

The in-flight target is ``groups_per_call`` groups, at most ``max_batch`` sequences. A delivery is
acked once all of its groups are put. Staleness: a group is handed to the engine only once the weights
are at its ``min_version`` (the feeder issued it after that version was published, so the wait is the
transfer's), and versions only grow while it generates, so the bound holds for every token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlflow.roles import reports, schema
from rlflow.roles.context import IDLE_WAIT_S, RoleContext, ack_work, next_rows, renew_leases

LINGER_S = 0.05  # longest a ready group waits for others to share its put (the trainer waits that much at most)


@dataclass
class _Taken:
    """A delivery being generated: its rows' results so far, by group."""

    delivery: object
    gens: list = field(default_factory=list)  # [row] its Generation once it ended, else None
    groups: dict = field(default_factory=dict)  # group id -> its rows
    group_of: list = field(default_factory=list)  # [row] its group id
    left: int = 0  # rows not yet put


def serve_in_flight(cfg, ctx: RoleContext, engine, synced) -> None:
    """The loop (see the module docstring). ``synced(need=None)`` applies the newest weights without
    waiting, or waits for version ``need``; ``cfg`` is the RolloutConfig."""
    sampling = cfg.sampling()
    target = min(cfg.groups_per_call * cfg.group_size, cfg.max_batch)  # sequences in flight
    refill = max(cfg.group_size, target // 4)  # the least room worth taking groups for (a rebuild each time)
    state: dict[int, _Taken] = {}  # delivery key -> the delivery being generated
    order: dict[int, tuple[int, int]] = {}  # the engine's sequence index -> (delivery key, row), until handed over
    busy = {"since": time.time()}  # generating since the last put (its span and WORK report)
    next_key = iter(range(1 << 62))
    ready: list[tuple[int, list[int]]] = []  # (delivery key, rows) of groups ended and not yet put
    first_ready = 0.0  # when the oldest of them ended
    enough = max(1, cfg.groups_per_call // 4)
    numbered = 0  # the index the engine gives the next sequence handed to it in this call

    def take(groups: int, timeout: float) -> list[list[int]]:
        nonlocal numbered
        d = next_rows(ctx, "rollout", schema.ROLLOUT_INPUT, groups, groups=True, timeout=timeout)
        if d is None:
            return []
        synced(max(d.table.column("min_version").to_pylist()))  # at once unless its version is on its way
        key = next(next_key)
        t = _Taken(d, [None] * len(d), left=len(d))
        t.group_of = d.table.column("group_id").to_pylist()
        for row, gid in enumerate(t.group_of):
            t.groups.setdefault(gid, []).append(row)
        state[key] = t
        order.update({numbered + row: (key, row) for row in range(len(d))})
        numbered += len(d)
        return d.table.column("prompt_ids").to_pylist()

    def flush(force: bool = False) -> None:
        """Put the ready groups in one put, when enough are ready, the oldest waited LINGER_S, or ``force``."""
        if not ready or not (force or len(ready) >= enough or time.monotonic() - first_ready >= LINGER_S):
            return
        _put(ctx, [(state[key].delivery, rows, [state[key].gens[r] for r in rows]) for key, rows in ready], busy)
        for key, rows in ready:
            t = state[key]
            t.left -= len(rows)
            if t.left == 0:
                ack_work(ctx, t.delivery)
                del state[key]
        ready.clear()

    def between(running: int) -> list[list[int]] | None:
        flush()
        synced()
        renew_leases(ctx, (t.delivery for t in state.values()))
        room = target - running
        return take(room // cfg.group_size, 0) if room >= refill else None

    def finished(index: int, gen) -> None:
        nonlocal first_ready
        key, row = order.pop(index)
        t = state[key]
        t.gens[row] = gen
        group = t.groups[t.group_of[row]]
        if any(t.gens[r] is None for r in group):
            return
        if not ready:
            first_ready = time.monotonic()
        ready.append((key, group))

    ctx.report(reports.READY)
    while True:
        synced()
        order.clear()
        numbered = 0  # the engine numbers each call's sequences from 0
        prompts = take(cfg.groups_per_call, IDLE_WAIT_S)
        if not prompts:
            continue
        busy["since"] = time.time()
        gens = engine.generate(prompts, sampling, between=between, finished=finished)
        for index, g in enumerate(gens):  # an engine that hands nothing over as it goes: everything now
            if g is not None and index in order:
                finished(index, g)
        flush(force=True)


def _put(ctx: RoleContext, groups: list[tuple], busy: dict) -> None:
    """Put finished groups' samples in one put (``groups``: (delivery, its rows, their generations) each);
    the time since the last put is a ``generate`` span of them (one span per call would stay open for
    as long as the engine never stops, and the trace and the capacity advice would see nothing of it)."""
    uids, gens = [], []
    for d, rows, group_gens in groups:
        delivered = d.uids
        uids += [delivered[r] for r in rows]
        gens += group_gens
    row = {"uid": uids, "response_ids": [g.response_ids for g in gens],
           "rollout_logprobs": [g.logprobs for g in gens], "finish_reason": [g.finish_reason for g in gens],
           **token_versions(gens)}
    ctx.bus.put(row, missing="skip")
    now, tokens = time.time(), sum(len(g.response_ids) for g in gens)
    ctx.timeline.add("generate", busy["since"], now - busy["since"], samples=len(gens), tokens=tokens,
                     version=min(row["version_start"]), in_flight=True)
    ctx.report(reports.WORK, samples=len(gens), tokens=tokens, seconds=now - busy["since"],
               version=min(row["version_start"]))
    busy["since"] = now


def token_versions(gens: list) -> dict[str, list]:
    """The version columns of ``gens``: each token's version, and the oldest and newest of them."""
    for g in gens:
        if g.token_versions is None or len(g.token_versions) != len(g.response_ids):
            raise ValueError(f"rollout.update=in_flight: the engine must give every token's version "
                             f"(Generation.token_versions, engines/base.py); got {g.token_versions!r} for "
                             f"{len(g.response_ids)} tokens")
    return {"token_versions": [g.token_versions for g in gens],
            "version_start": [min(g.token_versions, default=g.version or 0) for g in gens],
            "version_end": [max(g.token_versions, default=g.version or 0) for g in gens]}
