"""The capacity model (flow/observe/capacity.py) on timelines whose answer is known, and the span recorder."""

from __future__ import annotations

import math

from rlflow.flow.observe.capacity import advise
from rlflow.roles.context import Timeline

CONFIG = {"flow": {"staleness": 1},
          "actor": {"replicas": 1, "threads": 1, "kl_coef": 0.0},
          "rollout": {"replicas": 1, "threads": 1}, "reward": {"replicas": 1}, "reference": {"replicas": 1, "threads": 1}}


def timeline(steps: int, train_s: float, wait_s: float, gen_rate: float, score_rate: float, batch: int = 64,
             rollouts: int = 1) -> tuple[list[dict], list[dict]]:
    """(metrics, timeline records) of a run with these per-step times and per-replica rates."""
    metrics, records, t = [], [{"kind": "start", "time": 0.0}], 100.0
    for step in range(1, steps + 1):
        records.append(_span("actor", 0, "wait", t, wait_s, step=step))
        records.append(_span("actor", 0, "train", t + wait_s, train_s, step=step, optimizer_step=True))
        for r in range(rollouts):
            records.append(_span("rollout", r, "generate", t, batch / rollouts / gen_rate, samples=batch // rollouts))
        records.append(_span("reward", 0, "score", t, batch / score_rate, samples=batch))
        t += wait_s + train_s
        metrics.append({"step": step, "time": t, "samples": batch, "actor/step_s": wait_s + train_s, "actor/wait_s": wait_s,
                        "sync/encode_s": 0.01, "sync/transfer_s": 0.01, "sync/apply_s": 0.01})
    return metrics, records


def _span(role: str, replica: int, name: str, t: float, d: float, **args) -> dict:
    return {"kind": "span", "role": role, "replica": replica, "incarnation": 0, "name": name, "t": t, "d": d, "args": args}


def test_slow_rollout_is_named_with_the_replicas_that_keep_up():
    # the trainer consumes 64 samples per 0.2s = 320/s; one rollout makes 100/s: 4 replicas are needed
    metrics, records = timeline(40, train_s=0.2, wait_s=0.44, gen_rate=100.0, score_rate=5000.0)
    a = advise(metrics, records, CONFIG, cores=64)
    assert a.bottleneck == "rollout"
    assert math.isclose(a.demand, 320.0, rel_tol=1e-6)
    assert math.isclose(a.stages["rollout"].per_replica, 100.0, rel_tol=1e-6)
    assert a.stages["rollout"].needed == 4
    assert "rollout.replicas=4" in a.overrides
    assert "reward.replicas" not in " ".join(a.overrides)  # reward keeps up (5000/s)


def test_episodes_bound_by_their_environments_are_told_the_workers_that_keep_up():
    # 64 episodes per step, the trainer consumes them at 64 / 0.2s = 320/s; each episode holds its worker for
    # 0.5s and there are 4 workers x 2 rollout replicas: 16 episodes/s, so 320 x 0.5 / 2 = 80 workers per replica
    metrics, records = timeline(40, train_s=0.2, wait_s=3.8, gen_rate=1000.0, score_rate=8000.0, rollouts=2)
    for r in records:
        if r.get("name") == "generate":  # turns, not samples: the rollout stage is left out
            r["args"]["turns"] = True
    for step in range(1, 41):
        t = 100.0 + (step - 1) * 4.0
        records += [_span("env", i % 2, "episode", t + i * 0.01, 0.5, samples=1, turns=2) for i in range(64)]
    config = {**CONFIG, "rollout": {"replicas": 2, "threads": 1}, "env": {"workers": 4}}
    a = advise(metrics, records, config)
    assert "rollout" not in a.stages and a.stages["env"].replicas == 8
    assert math.isclose(a.stages["env"].per_replica, 2.0, rel_tol=1e-6)
    assert a.bottleneck == "env" and "env.workers=80" in a.overrides
    assert any("Add environment workers: env.workers=80" in line for line in a.lines)


def test_staleness_bound_too_small_to_hide_generation_is_raised():
    # generation takes 64/400 = 0.16s and sync 0.03s of a 0.1s step: k >= ceil(0.206/0.1) = 3
    metrics, records = timeline(40, train_s=0.1, wait_s=0.05, gen_rate=1000.0, score_rate=4000.0)
    a = advise(metrics, records, CONFIG)
    assert a.stages["rollout"].capacity >= a.demand  # capacity is not the problem
    assert a.staleness_min == math.ceil((0.01 + 0.02 + 64 / 1000 + 64 / 4000) / 0.1)
    assert a.bottleneck == "staleness" and a.overrides == [f"flow.staleness={a.staleness_min}"]


def test_trainer_bound_run_gets_no_overrides():
    metrics, records = timeline(40, train_s=0.5, wait_s=0.001, gen_rate=2000.0, score_rate=8000.0)
    a = advise(metrics, records, CONFIG)
    assert a.bottleneck == "trainer" and a.overrides == []
    assert any("trainer is the bottleneck" in line for line in a.lines)


def test_on_policy_run_is_told_the_staleness_that_overlaps_generation():
    metrics, records = timeline(40, train_s=0.2, wait_s=0.2, gen_rate=1000.0, score_rate=8000.0)
    a = advise(metrics, records, {**CONFIG, "flow": {"staleness": 0}})
    assert a.overrides == ["flow.staleness=1"] and "on-policy" in " ".join(a.lines)


def test_start_up_steps_are_left_out_of_the_measurement():
    metrics, records = timeline(40, train_s=0.2, wait_s=0.0, gen_rate=1000.0, score_rate=8000.0)
    metrics[0]["actor/wait_s"] = metrics[0]["actor/step_s"] = 30.0  # the first step waits for the first weights
    a = advise(metrics, records, CONFIG)
    assert a.steps == 40 - 5 and math.isclose(a.wait_s, 0.0, abs_tol=1e-9)


def test_adding_replicas_on_full_cores_carries_the_caveat():
    metrics, records = timeline(40, train_s=0.2, wait_s=0.44, gen_rate=100.0, score_rate=5000.0)
    assert any("cores" in line for line in advise(metrics, records, CONFIG, cores=2).lines)
    assert not any("cores" in line for line in advise(metrics, records, CONFIG, cores=64).lines)


def test_too_short_a_run_gives_no_advice():
    metrics, records = timeline(1, train_s=0.2, wait_s=0.1, gen_rate=100.0, score_rate=5000.0)
    assert advise(metrics, records, CONFIG) is None
    assert advise(metrics, [], CONFIG) is None


def test_timeline_buffer_is_bounded_and_counts_what_it_dropped():
    t = Timeline()
    for i in range(Timeline.MAX_SPANS + 10):
        t.add("generate", float(i), 0.1)
    spans = t.take()
    assert len(spans) == Timeline.MAX_SPANS and t.dropped == 10 and spans[0]["t"] == 10.0
    assert t.take() == []


def test_last_take_closes_the_spans_still_open():
    t = Timeline()
    with t.span("wait", rows=0):
        assert t.take() == []  # an open span is not sent while it runs
        last = t.take(last=True)
    assert [(s["name"], s["args"]) for s in last] == [("wait", {"rows": 0, "unfinished": True})]
    assert [s["name"] for s in t.take()] == ["wait"]  # and its own end is recorded as usual
