"""``rlflow eval`` (flow/evaluate.py): a checkpoint's pass@k and mean reward on held-out prompts.

What they pin: the pass@k estimator is the chance that k samples drawn without replacement hold a pass;
the command, on a real run's checkpoint with the run's own settings, gives exactly the numbers of the
same evaluation done by hand with the engine, the task and the reward function; bad input is refused
naming the flag, with exit code 2.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from helpers import eval_scores, rlflow, rlflow_eval
from rlflow.flow.evaluate import pass_at_k
from rlflow.roles.config import RolloutConfig


def test_pass_at_k_is_the_chance_that_k_samples_drawn_hold_a_pass():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws), abs=1e-12)
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, model_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    r = rlflow(run_dir, model_cache, "flow.steps=3", "rollout.temperature=0.8", "rollout.max_new_tokens=7")
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


def test_eval_gives_the_numbers_of_the_same_evaluation_done_by_hand(trained, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from rlflow.engines.base import SamplingParams
    from rlflow.engines.hf import HFRolloutEngine
    from rlflow.flow.launcher import load_tokenizer
    from rlflow.tasks.builtin import get_task
    from rlflow.tasks.rewards import positional_match

    final = trained / "checkpoints" / "final"
    r = rlflow_eval(str(final), "--prompts", "6", "--samples", "4", "--k", "1", "2", "4", "--seed", "7",
              "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "eval.json").read_text())
    # the run's own settings: its task, reward and sampling (temperature 0.8, 7 new tokens)
    assert (figures["task"], figures["reward_fn"], figures["temperature"], figures["max_new_tokens"]) == \
        ("reverse", "rlflow.tasks.rewards.positional_match", 0.8, 7)
    assert "pass@2" in r.stdout and "reward/mean" in r.stdout  # the table

    # by hand: the task's generator at the seed, each prompt 4 times in a row, the engine seeded alike
    rng = random.Random(7)
    records = [get_task("reverse").make(rng, 3, 5) for _ in range(6)]
    tokenizer, decoder = load_tokenizer(str(final)), AutoTokenizer.from_pretrained(final)
    engine = HFRolloutEngine(str(final), RolloutConfig(device="cpu", dtype="float32", max_batch=256, seed=7))
    with torch.no_grad():
        gens = engine.generate([tokenizer(r["prompt"])["input_ids"] for r in records for _ in range(4)],
                               SamplingParams(max_new_tokens=7, temperature=0.8))
    texts = decoder.batch_decode([g.response_ids for g in gens], skip_special_tokens=True)
    rewards = [[positional_match(texts[4 * i + j], **records[i]) for j in range(4)] for i in range(6)]
    means = [sum(x) / 4 for x in rewards]
    assert figures["reward/mean"] == pytest.approx(sum(means) / 6, abs=1e-12)
    sd = math.sqrt(sum((m - sum(means) / 6) ** 2 for m in means) / 5)
    assert figures["reward/mean_ci95"] == pytest.approx(1.96 * sd / math.sqrt(6), abs=1e-12)
    for k in (1, 2, 4):
        by_hand = [sum(any(x >= 1.0 for x in d) for d in itertools.combinations(r_, k)) / math.comb(4, k)
                   for r_ in rewards]
        assert figures[f"pass@{k}"] == pytest.approx(sum(by_hand) / 6, abs=1e-12)
    assert figures["reward/errors"] == 0 and figures["prompts"] == 6 and figures["samples_per_prompt"] == 4


def test_eval_refuses_bad_input_naming_the_flag(trained, tmp_path):
    final = str(trained / "checkpoints" / "final")
    for args, message in (([str(tmp_path / "nothing")], "no such checkpoint directory"),
                          ([final, "--samples", "2", "--k", "4"], "--k [4]: each k must be between 1 and --samples (2)"),
                          ([final, "--reward", "nodots"], "reward.fn"),
                          ([final, "--data", str(tmp_path / "missing.jsonl")], "data.path")):
        r = rlflow_eval(*args)
        assert r.returncode == 2 and message in r.stdout + r.stderr, (args, r.stdout + r.stderr)


def test_periodic_evaluation_scores_each_due_checkpoint_as_rlflow_eval_does_by_hand(tmp_path, model_cache):
    """eval.every: the eval replica scores checkpoints/step-s (and final) while training goes on; its figures
    are those of `rlflow eval` run by hand on the same checkpoint, and reach eval.jsonl, metrics.jsonl
    (the next line, with eval/step), summary.json and the report's reward figure."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "flow.steps=12", "actor.checkpoint_every=3", "actor.checkpoint_keep=10",
               "eval.every=6", "eval.prompts=8", "eval.samples=2", "tracking.report=true")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [6, 12]
    assert json.loads((run_dir / "summary.json").read_text())["eval"] == rows[-1]
    by_hand = eval_scores(run_dir / "checkpoints" / "step-6", "--samples", "2", "--prompts", "8")
    assert {k: by_hand[k[5:]] for k in rows[0] if k.startswith("eval/")} == {k: v for k, v in rows[0].items() if k != "step"}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():  # whichever lines came after an eval
        m = json.loads(line)
        if "eval/step" in m:
            assert m["step"] > m["eval/step"] and m["eval/reward/mean"] == rows[[6, 12].index(m["eval/step"])]["eval/reward/mean"]
    assert (run_dir / "report" / "reward.png").stat().st_size > 0
    assert "eval at step 6: reward/mean" in " ".join(r.stdout.split())


def test_periodic_evaluation_settings_that_cannot_work_are_refused_naming_the_field():
    from rlflow.errors import ConfigError
    from rlflow.flow.config import RunConfig

    cfg = RunConfig()
    cfg.eval.every, cfg.actor.checkpoint_every = 15, 10
    with pytest.raises(ConfigError, match=r"eval.every.*multiple of actor.checkpoint_every=10"):
        cfg.check()
    cfg.eval.every, cfg.eval.data = 10, "/nonexistent/eval.jsonl"
    with pytest.raises(ConfigError, match=r"eval.data.*no such file"):
        cfg.check()
