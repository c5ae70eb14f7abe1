"""Capacity advice: ECHO-2's provisioning model, fed with what a run measured.

The learner never idles when both hold (docs/algorithms.md, "Capacity model"):

    throughput   Λ ≥ B / T_train                      the producing roles keep up with the trainer
    staleness    k ≥ ⌈(T_publish + T_disseminate + T_generate) / T_train⌉
                                                      a version's batch is ready when the trainer needs it

Measured, over the steady part of the run (the first 10% of steps, start-up and warm-up, are left out):
- B: samples per step; T_train: the trainer's seconds per step minus its waiting for data (metrics
  ``actor/step_s - actor/wait_s``); B / T_train is the rate it consumes samples when never kept waiting;
- per replica of each producing role (rollout, reward, reference), samples per busy second from its
  ``generate`` / ``score`` spans (``flow/observe/timeline.py``); Λ of a role is replicas x that rate;
- T_publish: ``sync/encode_s``; T_disseminate: ``sync/transfer_s`` (publication to the slowest replica
  having the bytes) + ``sync/apply_s``; T_generate: a batch through the producing roles,
  B / Λ_rollout + max(B / Λ_reward, B / Λ_reference).

The advice names the binding side of each inequality and the override that satisfies it, and says
what the measurement cannot promise: a rate measured while roles share cores holds for a new replica
only if it gets cores of its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from rlflow.flow.observe.timeline import spans_by_replica, steady, steady_window

PRODUCERS = {"rollout": "generate", "env": "episode", "reward": "score", "reference": "score"}  # role -> the span
# of its work. With an environment (env.cls) a sample is an episode: its producer is the pool of environment
# workers, each holding one episode at a time, so its rate per worker is 1 / the mean episode time and its
# capacity workers x rollout replicas / that (Little's law); the rollout's generate spans count turns then,
# not samples, and are left out.
WAIT_OK = 0.05  # a trainer waiting less than this fraction of its steps is the bottleneck itself


@dataclass
class Stage:
    """One producing role's measured capacity."""

    role: str
    replicas: int
    samples: int  # samples its replicas produced in the steady window
    busy_s: float  # seconds its replicas spent producing them (summed over replicas)
    per_replica: float  # samples/s one replica produces while busy
    capacity: float  # Λ: replicas x per_replica
    busy_frac: float  # busy_s / (replicas x window): how much of its time the role worked
    needed: int  # replicas for Λ >= B / T_train


@dataclass
class Advice:
    """The model's inputs, both sides of each inequality, and what to change."""

    steps: int  # steady steps measured
    batch: int  # B
    step_s: float  # mean seconds per step
    train_s: float  # T_train
    wait_s: float  # mean seconds per step the trainer waited for data
    demand: float  # B / T_train: samples/s the trainer consumes when it never waits
    stages: dict[str, Stage]
    publish_s: float
    disseminate_s: float
    generate_s: float  # T_generate
    staleness: int | None  # the run's flow.staleness
    staleness_min: int  # ⌈(T_publish + T_disseminate + T_generate) / T_train⌉ (at least 1)
    bottleneck: str  # "trainer", a producing role, or "staleness"
    overrides: list[str] = field(default_factory=list)  # recipe overrides that follow the advice
    lines: list[str] = field(default_factory=list)  # the advice in words

    def to_dict(self) -> dict:
        return asdict(self)


def advise(metrics: list[dict], records: list[dict], config: dict, cores: int | None = None) -> Advice | None:
    """The advice for one run, or None when it has too few steps, or no timeline, to measure.

    ``metrics``: metrics.jsonl records; ``records``: timeline.jsonl records (``flow/observe/timeline.py``);
    ``config``: the run's resolved config.yaml as a dict; ``cores``: the cores of the machine that ran
    it (local launcher), for the caveat about adding replicas.
    """
    kept, window = steady(metrics), steady_window(records, metrics)
    if window is None or "actor/step_s" not in kept[0]:
        return None
    spans = spans_by_replica(records)
    step_s = _mean(m["actor/step_s"] for m in kept)
    wait_s = _mean(m["actor/wait_s"] for m in kept)
    train_s = max(step_s - wait_s, 1e-9)
    batch = round(_mean(m["samples"] for m in kept))
    demand = batch / train_s
    stages = {role: stage for role in PRODUCERS if (stage := _stage(role, spans, window, demand, config))}
    publish_s = _mean(m.get("sync/encode_s", 0.0) for m in kept)
    disseminate_s = _mean(m.get("sync/transfer_s", 0.0) for m in kept) + _mean(m.get("sync/apply_s", 0.0) for m in kept)
    generate_s = _batch_time(stages, batch)
    staleness = config["flow"]["staleness"]
    k_min = max(1, math.ceil((publish_s + disseminate_s + generate_s) / train_s))
    advice = Advice(steps=len(kept), batch=batch, step_s=step_s, train_s=train_s, wait_s=wait_s, demand=demand,
                    stages=stages, publish_s=publish_s, disseminate_s=disseminate_s, generate_s=generate_s,
                    staleness=staleness, staleness_min=k_min, bottleneck="trainer")
    _decide(advice, config, cores)
    return advice


def _stage(role: str, spans: dict[str, list[dict]], window: tuple[float, float], demand: float,
           config: dict) -> Stage | None:
    """A role's rate from its work spans that started within ``window`` (the steady steps); None: it did no work there."""
    lo, hi = window
    work = [s for name, ss in spans.items() if name.startswith(f"{role}-") for s in ss
            if s["name"] == PRODUCERS[role] and lo <= s["t"] < hi and s["args"].get("turns") is not True]
    samples = sum(s["args"].get("samples", 0) for s in work)
    busy = sum(s["d"] for s in work)
    if not samples or busy <= 0:
        return None
    replicas = int(config["env"]["workers"] * config["rollout"]["replicas"] if role == "env" else config[role]["replicas"])
    per_replica = samples / busy
    return Stage(role=role, replicas=replicas, samples=samples, busy_s=busy, per_replica=per_replica,
                 capacity=replicas * per_replica, busy_frac=busy / (replicas * (hi - lo)) if hi > lo else 0.0,
                 needed=max(1, math.ceil(demand / per_replica)))


def _batch_time(stages: dict[str, Stage], batch: int) -> float:
    """Seconds for one batch to pass the producing roles: generated, then scored (reward and reference in parallel)."""
    t = lambda role: batch / stages[role].capacity if role in stages and stages[role].capacity > 0 else 0.0  # noqa: E731
    return t("env" if "env" in stages else "rollout") + max(t("reward"), t("reference"))


def _decide(a: Advice, config: dict, cores: int | None) -> None:
    """Fill ``bottleneck``, ``overrides`` and ``lines``."""
    waiting = a.wait_s / a.step_s if a.step_s > 0 else 0.0
    short = [s for s in a.stages.values() if s.capacity < a.demand]
    a.lines.append(f"The trainer takes {a.train_s:.3f}s per step of {a.batch} samples ({a.demand:.0f} samples/s when "
                   f"never kept waiting) and waited {a.wait_s:.3f}s per step ({waiting:.0%} of its time).")
    for s in a.stages.values():
        a.lines.append(f"{s.role}: {s.replicas} replica(s) x {s.per_replica:.0f} samples/s = {s.capacity:.0f} samples/s "
                       f"({s.capacity / a.demand:.2f}x what the trainer consumes; busy {s.busy_frac:.0%}).")
    a.lines.append(f"Staleness that hides publishing ({a.publish_s:.3f}s), dissemination ({a.disseminate_s:.3f}s) "
                   f"and producing a batch ({a.generate_s:.3f}s) behind a {a.train_s:.3f}s step: "
                   f"k >= {a.staleness_min} (the run has flow.staleness={_k(a.staleness)}).")
    for s in short:
        if s.role == "env":  # its replicas are worker slots: env.workers per rollout replica
            rollouts = int(config["rollout"]["replicas"])
            workers = math.ceil(s.needed / rollouts)
            a.overrides.append(f"env.workers={workers}")
            a.lines.append(f"Add environment workers: env.workers={workers} (x {rollouts} rollout replica(s)) keeps "
                           f"{workers * rollouts} episodes going, {workers * rollouts * s.per_replica:.0f} samples/s "
                           f">= {a.demand:.0f} at the measured {1 / s.per_replica:.2f}s per episode.")
            continue
        a.overrides.append(f"{s.role}.replicas={s.needed}")
        a.lines.append(f"Add {s.role} replicas: {s.role}.replicas={s.needed} brings {s.role} to "
                       f"{s.needed * s.per_replica:.0f} samples/s >= {a.demand:.0f}.")
    if a.staleness is not None and a.staleness < a.staleness_min:
        a.overrides.append(f"flow.staleness={a.staleness_min}")
        a.lines.append(f"Raise the staleness bound: flow.staleness={a.staleness_min} lets generation of the next "
                       f"batches overlap training" + (" (0 is on-policy: the trainer waits for every batch by design)."
                                                      if a.staleness == 0 else "."))
    if short:
        a.bottleneck = min(short, key=lambda s: s.capacity / a.demand).role
    elif a.overrides:
        a.bottleneck = "staleness"
    elif waiting < WAIT_OK:
        a.lines.append("The trainer is the bottleneck: more rollout, reward or reference replicas would not make "
                       "this run faster; a faster trainer would (actor.replicas for data parallelism, a GPU).")
        spare = [s for s in a.stages.values() if s.replicas > s.needed]
        a.lines += [f"{s.role}.replicas={s.needed} would still keep up (it has {s.replicas})." for s in spare]
    else:
        a.bottleneck = "overhead"
        a.lines.append(f"Capacity and staleness suffice in this model, yet the trainer waited {waiting:.0%}: the time "
                       f"goes to what the model leaves out (bus transfers, admission, roles sharing cores).")
    threads = _threads(config)
    if cores and a.overrides and any(o.split(".")[0] in a.stages for o in a.overrides) and threads >= cores:
        a.lines.append(f"Caveat: the roles already run {threads} threads on {cores} cores; a new replica here shares "
                       f"cores, so it adds less than its measured rate (under launcher=ray give it cores of its own).")


def _threads(config: dict) -> int:
    """Torch threads the run's roles use (reward replicas count one each)."""
    n = config["actor"]["replicas"] * config["actor"]["threads"] + config["rollout"]["replicas"] * config["rollout"]["threads"]
    n += config["reward"]["replicas"]
    if config["actor"].get("kl_coef", 0) > 0:
        n += config["reference"]["replicas"] * config["reference"]["threads"]
    return n


def _k(staleness: int | None) -> str:
    return "null (fully async)" if staleness is None else str(staleness)


def _mean(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else 0.0


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
