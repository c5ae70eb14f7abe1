"""Multi-turn episodes (roles/episodes.py, envs/): exact masking, failure isolation, tools, per-token versions."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from conftest import SAMPLING
from rlflow.algo.step import StepAccumulator
from rlflow.engines.hf import HFTrainEngine
from rlflow.envs.config import EnvConfig
from rlflow.envs.pool import EnvPool
from rlflow.envs.tools import ToolEnv, calc, tool
from rlflow.roles.config import ActorConfig

TESTS = str(Path(__file__).resolve().parent)


def _episode_table(observation_logprob: float, ref_logprob: float) -> pa.Table:
    """One group of 4 two-turn episodes: model tokens (mask 1) around an observation (mask 0) whose
    rollout and reference logprobs are ``observation_logprob`` / ``ref_logprob``."""
    rows = []
    for i in range(4):
        turn1, obs, turn2 = [20 + i, 21, 2], [40, 41, 42, 43], [22, 23 + i, 2]
        mask = [1] * 3 + [0] * 4 + [1] * 3
        rollout = [-1.5, -0.7, -0.2] + [observation_logprob] * 4 + [-0.9, -1.1, -0.3]
        rows.append({"uid": f"u{i}", "group_id": "g0", "prompt_ids": [1, 10 + i, 11], "response_ids": turn1 + obs + turn2,
                     "rollout_logprobs": rollout, "ref_logprobs": [r if m else ref_logprob for r, m in zip(rollout, mask)],
                     "version_start": 0, "version_end": 0, "reward": float(i % 2), "loss_mask": mask,
                     "turn_starts": [0, 7], "finish_reason": "done", "token_versions": [0] * 10,
                     "env_info": json.dumps({"counters": {"tool_call": 1}, "env_seconds": 0.1, "seconds": 0.2})})
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("extra", [{}, {"old_logprobs": "recompute", "correction": "tis", "kl_coef": 0.1}],
                         ids=["rollout-ratio", "recompute-tis-kl"])
def test_masked_out_tokens_contribute_exactly_nothing_to_the_loss_or_the_gradient(tiny_model, extra):
    """Observation tokens are context, never trained: whatever logprobs they carry (here absurd ones,
    which would overflow any ratio), the step's loss, gradient, token count and ESS are those of sane ones."""
    cfg = ActorConfig(micro_batch=4, **extra)
    results = []
    for observation_logprob, ref_logprob in ((0.0, 0.0), (-1e4, 1e4)):
        torch.manual_seed(0)
        engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
        acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
        acc.add(_episode_table(observation_logprob, ref_logprob))
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
        results.append((acc.total.loss_sum, acc.total.tokens, grads, acc.total.log_w()))
    (loss0, tokens0, grads0, w0), (loss1, tokens1, grads1, w1) = results
    assert tokens0 == tokens1 == 4 * 6  # only the sampled tokens count
    assert loss0 == loss1 and torch.equal(w0, w1) and math.isfinite(loss0)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    assert sum(float(g.abs().sum()) for g in grads0.values()) > 0


def test_episode_metrics_count_turns_tools_and_the_masked_out_share(tiny_model):
    engine = HFTrainEngine(tiny_model, ActorConfig(), SAMPLING)
    acc = StepAccumulator(engine, ActorConfig(), SAMPLING.max_new_tokens)
    acc.add(_episode_table(0.0, 0.0))
    out = acc.finish()
    assert out["episode/turns_mean"] == 2 and out["env/tool_call"] == 1
    assert out["episode/masked_out_frac"] == pytest.approx(0.4) and out["env/failures"] == 0


@pytest.fixture
def importable_tests(monkeypatch):
    """Environment workers import the test's environments as a user's run imports theirs: from the path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))


def _run_episode(pool: EnvPool, episode: str, record: dict, actions: list[str], timeout: float = 30) -> list:
    outcomes, pending = [], [("reset", None)] + [("step", a) for a in actions]
    pool.reset(episode, record)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in pool.poll(0.2):
            outcomes.append(out)
            pending.pop(0)
            if out.failure or (out.step and out.step.done) or not pending:
                pool.close(episode)
                return outcomes
            pool.step(episode, pending[0][1])
    raise AssertionError(f"episode {episode} got no outcome within {timeout}s: {outcomes}")


def test_a_raising_hanging_or_dying_environment_costs_its_episode_only(importable_tests):
    """Each failure ends its own episode with its kind; the pool replaces the worker and the next
    episodes run normally on the same pool."""
    pool = EnvPool(EnvConfig(cls="user_envs.FlakyEnv", workers=2, step_timeout_s=2.0))
    try:
        ends = {}
        for i, behaviour in enumerate(["ok", "raise", "hang", "die", "bad", "ok", "ok"]):
            outs = _run_episode(pool, f"e{i}", {"behaviour": behaviour}, ["a", "b", "c"])
            ends[f"{i}:{behaviour}"] = outs[-1].failure or ("done" if outs[-1].step.done else "open")
            if behaviour == "raise":
                assert "RuntimeError: the environment broke" in outs[-1].error
            if behaviour == "bad":
                assert "FlakyEnv.step returned reward 'not a number'" in outs[-1].error
        assert ends == {"0:ok": "done", "1:raise": "env_error", "2:hang": "env_timeout", "3:die": "env_died",
                        "4:bad": "env_error", "5:ok": "done", "6:ok": "done"}
        assert pool.stats["restarts"] == 2 and pool.stats["bad_messages"] == 0
    finally:
        pool.shutdown()
    assert not os.path.exists(pool.spawner.dir)  # the private socket directory goes with the pool


def test_environment_workers_die_with_a_replica_that_was_killed(importable_tests):
    """A replica blocks SIGTERM (its own handler thread waits for it) and its workers inherit the mask:
    they must unblock it, or the signal their dying parent sends them waits for ever (and an orphaned
    worker keeps the run's output pipes open)."""
    import subprocess
    import sys

    script = ("import signal, sys, time\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as a role process does\n"
              "from rlflow.envs.config import EnvConfig\nfrom rlflow.envs.pool import EnvPool\n"
              "pool = EnvPool(EnvConfig(cls='user_envs.FlakyEnv', workers=2))\n"
              "while not all(w.ready for w in pool.workers.values()):\n    pool.poll(0.1)\n"
              "print(*[w.proc.pid for w in pool.workers.values()], flush=True)\ntime.sleep(600)\n")
    replica = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in replica.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        replica.kill()
        replica.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text() for pid in pids):
        assert time.monotonic() < deadline, f"environment workers {pids} outlived their killed replica"
        time.sleep(0.1)


def test_an_environment_class_that_cannot_load_fails_the_replica_naming_it(importable_tests):
    pool = EnvPool(EnvConfig(cls="user_envs.NoSuchEnv", workers=1))
    try:
        with pytest.raises(RuntimeError, match="env.cls=user_envs.NoSuchEnv.*has no attribute 'NoSuchEnv'"):
            for _ in range(100):
                pool.poll(0.1)
    finally:
        pool.shutdown()


def test_a_malformed_or_unknown_tool_call_gets_an_observation_never_a_crash():
    @tool(name="echo")
    def say(text: str) -> str:
        return text

    env = ToolEnv([calc, say])
    assert env.step("calc(37*48)") == (" -> 1776\n", 0.0, False, {"tool_call": 1})
    for action, shown in [("calc(37*", "closing parenthesis"), ("calk(1+1)", "unknown tool 'calk'; the tools are calc, echo"),
                          ("calc(2**99999)", "only numbers"), ("calc(1/0)", "ZeroDivisionError"),
                          ("calc(__import__('os'))", "only numbers")]:
        observation, reward, done, info = env.step(action)
        assert shown in observation and not done and reward == 0.0, (action, observation)
        assert set(info) <= {"malformed_call", "tool_error"} and sum(info.values()) == 1
    assert env.step("1776") == (None, 0.0, True, {})  # no call: the answer, the episode ends
    hermes = ToolEnv(["rlflow.envs.tools.calc"], format="hermes")
    assert hermes.step('<tool_call>{"name": "calc", "arguments": {"expression": "6*7"}}</tool_call>')[0] == \
        "<tool_response>\n42\n</tool_response>\n"
    for action, shown in [('<tool_call>{"name": "calc"', "not closed"), ("<tool_call>{oops}</tool_call>", "not valid JSON"),
                          ('<tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>', "unexpected keyword")]:
        assert shown in hermes.step(action)[0], action


from helpers import metrics, rlflow, said  # noqa: E402

EPISODES = ["data.task=reverse", "rollout.group_size=4", "actor.groups_per_step=4", "rollout.max_new_tokens=4",
            "env.cls=user_envs.FlakyEnv", "env.max_turns=3", "env.workers=8", "reward.fn=rlflow.tasks.rewards.env_reward"]


def test_a_run_whose_environments_raise_hang_and_die_finishes_with_every_sample_accounted_for(tmp_path, model_cache):
    """About 3 episodes in 8 fail (FlakyEnv by prompt): each costs its episode, reported and not trained;
    the run trains every step and its ledger balances."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *EPISODES, "env.step_timeout_s=2", "flow.steps=4")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert sum(m["env/failures"] for m in rows) > 0 and "an environment failed" in said(r)
    samples = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert samples["consumed_more_than_once"] == samples["issued_not_consumed"] == samples["consumed_not_issued"] == 0


def test_weights_change_between_turns_and_no_token_is_staler_than_k(tmp_path, model_cache):
    """With a slow environment the actor publishes while episodes are between turns: later turns run at a
    newer version (per-token versions record it), and staleness, measured from a sample's oldest token,
    never exceeds flow.staleness."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *EPISODES, "+env.kwargs.behaviour=ok", "+env.kwargs.sleep=0.1", "flow.staleness=1",
               "flow.steps=6")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert max(m["episode/multi_version_frac"] for m in rows) > 0, [m["episode/multi_version_frac"] for m in rows]
    assert max(m["staleness/max"] for m in rows) <= 1
    assert all(m["episode/turns_mean"] == 3 and m["env/turn"] == 3 for m in rows)


# ---------------------------------------------------------------------------------------- chat templates
CHAT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Like reasoning models' templates: an assistant turn's <think>...</think> is dropped once it is history.
THINKING = CHAT.replace("{{ m.content }}", "{{ m.content.split('</think>')[-1] if m.role == 'assistant' else m.content }}")


def _chat_tokenizer(template: str):
    from rlflow.engines.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


def _play(turns, tok, record: dict, model_turns: list[str], observations: list[str]):
    """An episode as roles/episodes.py grows it: (every token after the prompt, segment starts, conversation)."""
    conversation = turns.start(record)
    prompt = turns.render(conversation)  # what the feeder put on the bus
    tokens, segments = [], []
    for turn, observation in zip(model_turns, observations):
        tokens += tok(turn, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # sampled, with its end
        context = tokens[segments[-1]:] if segments else prompt + tokens
        ids, new = turns.observation(conversation, context, turn, observation)
        if new:
            segments.append(len(tokens))
        tokens += ids
    return prompt, tokens, segments, conversation


def test_an_episode_token_stream_is_what_the_chat_template_renders_for_its_conversation():
    """Where the exact-prefix rule holds, only what the template adds for each observation is appended:
    prompt + stream is token for token the template's rendering of the whole conversation."""
    from rlflow.roles.turns import ChatTurns

    tok = _chat_tokenizer(CHAT)
    turns = ChatTurns(tok, max_observation_tokens=64, role="tool")
    prompt, tokens, segments, conversation = _play(turns, tok, {"prompt": "12*34="}, ["calc(12*34)", "408"],
                                                   [" -> 408", " wrong? try again"])
    assert segments == []
    assert prompt + tokens == turns.render(conversation)
    assert conversation[-1] == {"role": "tool", "content": " wrong? try again"}
    long = ChatTurns(tok, max_observation_tokens=5, role="user")  # observations are cut before they are rendered
    _, _, _, conversation = _play(long, tok, {"prompt": "x"}, ["a"], ["0123456789"])
    assert conversation[-1]["content"] == "01234"


def test_where_the_template_rewrites_history_a_new_segment_starts_instead():
    """A reasoning template drops earlier <think> blocks: the stream is not a prefix of the rendering any
    more, so the rendering starts a new segment (the model's next turn sees exactly it), and the tokens
    before it stay as sampled."""
    from rlflow.roles.turns import ChatTurns

    tok = _chat_tokenizer(THINKING)
    turns = ChatTurns(tok, max_observation_tokens=64)
    prompt, tokens, segments, conversation = _play(turns, tok, {"prompt": "12*34="},
                                                   ["<think>12*34 is 408</think>calc(12*34)", "408"], [" -> 408", " ok"])
    first_turn = tok("<think>12*34 is 408</think>calc(12*34)", add_special_tokens=False)["input_ids"]
    assert tokens[: len(first_turn)] == first_turn  # what was sampled is kept as sampled
    # The first observation re-renders history without the thought: a new segment. From there on the
    # stream is again a prefix of each rendering, so the second observation is appended in place.
    assert len(segments) == 1 and tokens[segments[0]:] == turns.render(conversation)
    assert "12*34 is 408" not in tok.decode(tokens[segments[0]:])


def test_each_segment_is_scored_against_its_own_context(tiny_model):
    from rlflow.algo import segments
    from rlflow.engines.hf import load_model, sequence_logprobs

    model = load_model(tiny_model, "float32", "cpu")

    def fn(p, r):
        return sequence_logprobs(model, p, r, 1.0, "cpu")

    prompt, response = [1, 20, 21], [30, 31, 2, 40, 41, 42, 50, 51, 2]  # a new context starts at 3: [40, 41, 42]
    with torch.no_grad():
        got = segments.score(fn, [prompt, prompt], [response, response[:5]], [[3], []])
        first = fn([prompt], [response[:3]])[0]
        second = fn([response[3:4]], [response[4:]])[0]
        plain = fn([prompt], [response[:5]])[0]
    assert torch.allclose(got[0, :3], first, atol=1e-6) and got[0, 3] == 0
    assert torch.allclose(got[0, 4:], second, atol=1e-6)
    assert torch.allclose(got[1, :5], plain, atol=1e-6) and torch.all(got[1, 5:] == 0)
    assert segments.split(prompt, response, [0]) == [(response[:1], response[1:], 1)]  # a segment at the very start


def test_an_episode_longer_than_its_lease_keeps_its_rows(tmp_path, model_cache):
    """Episodes of 3 slow turns (over 6 s) under a 5 s lease: the rollout renews its deliveries' leases
    while their episodes run, so none expires and no row is handed to another replica."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *EPISODES, "+env.kwargs.behaviour=ok", "+env.kwargs.sleep=2.0",
               "flow.lease_seconds=5", "actor.groups_per_step=2", "flow.steps=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert min(m["episode/seconds_mean"] for m in metrics(run_dir)) > 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["supervision"]["lease_expiries"] == 0 and summary["samples"]["consumed_more_than_once"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)  # agent_calc's 60 steps take about 2 minutes on 2 cores
@pytest.mark.parametrize("recipe,counter,rises", [("tool_calc", "env/tool_call", True), ("guess", "env/invalid", False),
                                                  ("agent_calc", "env/tool_call", True)])
def test_the_built_in_agentic_recipes_learn(tmp_path, model_cache, recipe, counter, rises):
    """The tool task learns to call its tool (also when an OpenAI-client agent plays it: agent_calc) and the
    guessing game to use its hints: reward over the last 10 of 60 steps clearly above the first 10, and
    the behaviour that pays moves the right way."""
    import subprocess
    import sys

    from helpers import REPO, env

    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "rlflow", "-cn", recipe, f"run_dir={run_dir}", "flow.steps=60",
                        f"model.cache_dir={model_cache}",
                        "tracking.wandb=false", "tracking.report=false"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)

    def mean(key, part):
        return sum(m.get(key, 0.0) for m in part) / len(part)

    first, last = rows[:10], rows[-10:]
    assert mean("reward/mean", last) > mean("reward/mean", first) + 0.08, (mean("reward/mean", first), mean("reward/mean", last))
    assert (mean(counter, last) > mean(counter, first)) == rises, (mean(counter, first), mean(counter, last))
