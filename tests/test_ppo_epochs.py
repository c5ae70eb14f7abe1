"""Several optimizer steps per policy version (``actor.minibatches``, ``actor.epochs``; algo/step.py).

What they pin: a version trained in minibatches takes, minibatch by minibatch, the steps one-minibatch
versions would take on those groups; epochs > 1 move the ratio away from 1 so the clip acts (the first
update's ratio is exactly 1 against proximal logprobs scored once); the version moves on once per
version whatever the number of updates; and data-parallel or sharded ranks take the same updates as
one trainer.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from helpers import metrics, rlflow
from rlflow.algo.step import StepAccumulator
from rlflow.engines.hf import HFTrainEngine
from rlflow.roles.actor import ActorConfig

from conftest import G, GROUPS, SAMPLING


def table(samples: dict, groups: range) -> pa.Table:
    rows = [i for i in range(len(samples["uid"])) if i // G in groups]
    return pa.table({k: [v[i] for i in rows] for k, v in samples.items()})


def adam_steps(engine: HFTrainEngine) -> int:
    return int(next(iter(engine.optimizer.state.values()))["step"])


def test_minibatches_take_the_steps_that_versions_of_one_minibatch_each_would(tiny_model, reverse_samples):
    cfg = ActorConfig(minibatches=2, lr=1e-3, micro_batch=5)
    torch.manual_seed(0)
    held = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(held, cfg, SAMPLING.max_new_tokens)
    acc.add(table(reverse_samples, range(GROUPS)))
    out = acc.finish()
    assert held.version == 1 and adam_steps(held) == 2 and out["step/updated"] == 1
    assert len(out["minibatch/clip_frac"]) == len(out["minibatch/ess_ratio"]) == 2

    one = ActorConfig(lr=1e-3, micro_batch=5)
    torch.manual_seed(0)
    streamed = HFTrainEngine(tiny_model, one, SAMPLING)
    for half in (range(GROUPS // 2), range(GROUPS // 2, GROUPS)):  # the same groups, one version each
        acc = StepAccumulator(streamed, one, SAMPLING.max_new_tokens)
        acc.add(table(reverse_samples, half))
        acc.finish()
    assert streamed.version == 2 and adam_steps(streamed) == 2
    for (name, a), b in zip(held.model.named_parameters(), streamed.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name


@pytest.mark.parametrize("old_logprobs,extra", [("rollout", {}), ("recompute", {"correction": "tis"})])
def test_epochs_move_the_ratio_from_one_so_the_clip_acts(tiny_model, reverse_samples, old_logprobs, extra):
    cfg = ActorConfig(epochs=4, lr=3e-3, clip_low=0.05, clip_high=0.05, old_logprobs=old_logprobs, **extra)
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    acc.add(table(reverse_samples, range(GROUPS)))
    out = acc.finish()
    assert engine.version == 1 and adam_steps(engine) == 4
    clip, kl = out["minibatch/clip_frac"], out["minibatch/approx_kl"]
    assert len(clip) == 4 and out["actor/clip_frac"] > 0
    if old_logprobs == "recompute":  # proximal logprobs scored once, before any update: the first ratio is 1
        assert clip[0] == 0.0 and kl[0] == 0.0
    assert clip[-1] > 0 and kl[-1] > kl[0]

    cfg = ActorConfig(lr=3e-3, clip_low=0.05, clip_high=0.05, old_logprobs=old_logprobs, **extra)
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    acc.add(table(reverse_samples, range(GROUPS)))
    once = acc.finish()
    assert "minibatch/clip_frac" not in once and once["actor/clip_frac"] < out["actor/clip_frac"]


def test_a_version_split_into_minibatches_must_keep_groups_whole(tiny_model):
    from rlflow.errors import ConfigError

    with pytest.raises(ConfigError, match="actor.minibatches"):
        ActorConfig(groups_per_step=4, minibatches=5).check()
    ActorConfig(groups_per_step=6, replicas=2, minibatches=4).check()  # uneven minibatches of whole groups


EPOCHS = ["flow.staleness=0", "flow.steps=3", "actor.minibatches=2", "actor.epochs=2", "actor.old_logprobs=recompute",
          "actor.correction=tis"]  # proximal logprobs scored once per version, in lockstep when sharded


@pytest.fixture(scope="module")
def one_trainer_epochs(tmp_path_factory, tiny_model, model_cache):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    r = rlflow(run_dir, model_cache, *EPOCHS)
    assert r.returncode == 0, r.stdout + r.stderr
    return metrics(run_dir)


@pytest.mark.parametrize("parallel", ["replicate", "fsdp"])
def test_ranks_take_the_minibatch_updates_one_trainer_takes(tmp_path, one_trainer_epochs, model_cache, parallel):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *EPOCHS, "actor.replicas=2", f"actor.parallel={parallel}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["reward/mean"] for m in rows] == [m["reward/mean"] for m in one_trainer_epochs]
    for key in ("minibatch/loss", "minibatch/grad_norm", "minibatch/clip_frac"):
        ours = [x for m in rows for x in m[key]]
        theirs = [x for m in one_trainer_epochs for x in m[key]]
        assert len(ours) == 3 * 4 and ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), key
    assert json.loads((run_dir / "summary.json").read_text())["trainer"]["identical_weights"]
