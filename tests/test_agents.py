"""Any agent code (``env.agent``): the chat endpoint, the agent's failures, exact tokens from its calls."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlflow.envs.agent import AgentEndpoint, chat_request, completion_body
from rlflow.envs.config import EnvConfig
from rlflow.envs.pool import EnvPool
from rlflow.roles.turns import ChatTurns, PlainTurns
from test_episodes import CHAT, _chat_tokenizer

TESTS = str(Path(__file__).parent)
pytest.importorskip("openai")


@pytest.fixture
def importable_tests(monkeypatch):
    """Environment workers import the test's agents as a user's run imports theirs: from the path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))


def _completion(text: str, version: int = 7, **extra) -> dict:
    return {"message": {"role": "assistant", "content": text, **extra}, "finish_reason": "stop", "prompt_tokens": 3,
            "completion_tokens": 2, "version": version, "token_ids": [11, 12],
            "logprobs": [{"token": t, "logprob": -0.25, "bytes": list(t.encode()), "top_logprobs": []} for t in "ab"]}


def _until(pool: EnvPool, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outs := pool.poll(0.2):
            return outs
    raise AssertionError(f"the pool gave no outcome within {timeout}s")


def test_an_agent_calls_through_the_openai_client_and_gets_back_exactly_the_completion_sent(importable_tests, tmp_path):
    """Each chat call reaches the replica's side as a checked request; the completion comes back to the
    agent with its token ids, logprobs and version, and the agent's next call carries the reply in a form
    that extends the conversation (the normal form is a fixed point)."""
    pool = EnvPool(EnvConfig(agent="user_envs.scripted_agent", kwargs={"log": str(tmp_path)}, workers=1))
    try:
        pool.reset("e1", {"prompt": "37*48=", "turns": 2})
        (first,) = _until(pool)
        assert first.op == "reset" and first.request == {"messages": [{"role": "user", "content": "37*48="}],
                                                         "tools": None, "logprobs": True, "stop": None,
                                                         "max_tokens": None}
        call = {"id": "call_1_0", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "37*48"}'}}
        pool.answer("e1", _completion("", version=7, tool_calls=[call]))
        (second,) = _until(pool)
        sent = {"role": "assistant", "content": "", "tool_calls": [call]}
        assert second.request["messages"] == [*first.request["messages"], sent, {"role": "tool", "content": " -> 0\n"}]
        assert chat_request(second.request) == second.request
        pool.answer("e1", _completion("1776", version=8))
        (end,) = _until(pool)
        assert end.step.done and end.step.reward == 4.0 and end.step.info == {"calls": 2.0}
        pool.close("e1")
    finally:
        pool.shutdown()
    (log,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert [c["token_ids"] for c in log["calls"]] == [[11, 12], [11, 12]]
    assert [c["version"] for c in log["calls"]] == ["rlflow-v7", "rlflow-v8"]
    assert [c["logprobs"] for c in log["calls"]] == [[-0.25, -0.25]] * 2 and log["calls"][1]["content"] == "1776"


def test_an_agent_that_raises_hangs_returns_garbage_or_never_calls_costs_its_episode_only(importable_tests):
    pool = EnvPool(EnvConfig(agent="user_envs.scripted_agent", workers=1, step_timeout_s=2.0))
    try:
        ends = {}
        for i, script in enumerate(["raise", "hang", "garbage", "silent", "chat"]):
            pool.reset(f"e{i}", {"prompt": "1+1=", "script": script, "turns": 1})
            while True:
                (out,) = _until(pool)
                if out.request is None:
                    break
                pool.answer(f"e{i}", _completion("2"))
            pool.close(f"e{i}")
            ends[script] = (out.failure, out.error.split(":")[0] if out.failure else out.step.reward)
        assert ends == {"raise": ("env_error", "RuntimeError"), "hang": ("env_timeout", "the agent neither called the model nor returned within env.step_timeout_s=2s"),
                        "garbage": ("env_error", "TypeError"), "silent": (None, 0.5), "chat": (None, 2.0)}
        assert pool.stats["restarts"] == 1 and pool.stats["bad_messages"] == 0
    finally:
        pool.shutdown()


def test_a_closed_episode_whose_agent_keeps_running_recycles_its_worker_and_the_next_episode_still_runs(importable_tests):
    """Its worker exits rather than keep a thread it cannot stop; an episode sent to it meanwhile is not
    lost but goes to the fresh worker."""
    pool = EnvPool(EnvConfig(agent="user_envs.scripted_agent", workers=1))
    try:
        pool.reset("lingers", {"prompt": "1+1=", "script": "linger"})
        assert _until(pool)[0].request is not None
        pool.close("lingers")  # its waiting call gets a 404, and the agent goes on sleeping
        pool.reset("next", {"prompt": "2+2=", "turns": 1})
        (out,) = _until(pool)
        assert out.episode == "next" and out.request["messages"][0]["content"] == "2+2="
        pool.answer("next", _completion("4"))
        (end,) = _until(pool)
        assert end.step.done and end.failure is None
        assert pool.stats["recycled"] == 1 and pool.stats["deaths"] == 0
    finally:
        pool.shutdown()


def test_the_endpoint_refuses_what_it_cannot_honour_naming_the_field_and_serves_only_the_running_episode():
    seen = {}

    def agent(record: dict, base_url: str) -> float:
        def post(url: str, body) -> tuple[int, dict]:
            req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        ok = [{"role": "user", "content": "hi"}]
        for name, body in [("stream", {"messages": ok, "stream": True}), ("n", {"messages": ok, "n": 2}),
                           ("image", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                           ("role", {"messages": [{"role": "robot", "content": "hi"}]}), ("empty", {"messages": []}),
                           ("stop", {"messages": ok, "stop": ["", "x"]}), ("max_tokens", {"messages": ok, "max_tokens": 0})]:
            seen[name] = post(base_url, body)
        seen["stranger"] = post(base_url.replace(base_url.split("/")[3], "x" * 32), {"messages": ok})
        with urllib.request.urlopen(base_url + "/models", timeout=10) as r:
            seen["models"] = (r.status, json.loads(r.read()))
        seen["url"] = base_url
        return 1.0

    endpoint = AgentEndpoint(agent, {}, "agent")
    assert endpoint.start({"prompt": "hi"}) == {"reward": 1.0, "done": True, "info": {}}
    assert endpoint.close()
    assert {k: (v[0], v[1]["error"]["param"]) for k, v in seen.items() if k not in ("models", "url", "stranger")} == {
        "stream": (400, "stream"), "n": (400, "n"), "image": (400, "messages[0].content[0]"),
        "role": (400, "messages[0].role"), "empty": (400, "messages"), "stop": (400, "stop"),
        "max_tokens": (400, "max_tokens")}
    assert seen["stranger"][0] == 404 and seen["models"][1]["data"][0]["id"] == "policy"
    try:  # the episode is over: its URL serves nothing any more
        urllib.request.urlopen(seen["url"] + "/models", timeout=10)
        raise AssertionError("a closed episode's URL still answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_an_agent_s_calls_grow_the_stream_exactly_as_the_template_renders_its_conversation():
    """Tools go to the template and a <tool_call> comes back as tool_calls; the next call, carrying that
    reply, appends only its new messages, and the stream is what the template renders for the whole
    conversation. A call that edits history starts a new segment with the whole conversation."""
    tok = _chat_tokenizer(CHAT)
    turns = ChatTurns(tok, 64)
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    first = chat_request({"messages": [{"role": "system", "content": "use calc"}, {"role": "user", "content": "37*48="}],
                          "tools": tools})
    chat, stream, new_segment = turns.request(None, [], first)
    assert new_segment and stream == turns.render(first["messages"], tools)
    said = '<tool_call>{"name": "calc", "arguments": {"expression": "37*48"}}</tool_call>'
    stream += tok(said, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # sampled, with its end
    reply = turns.reply(chat, said)
    assert reply["content"] == "" and reply["tool_calls"][0]["function"] == {"name": "calc", "arguments": '{"expression": "37*48"}'}
    back = completion_body({**_completion(""), "message": reply}, 1)["choices"][0]["message"]  # what the agent gets
    second = chat_request({"messages": [*first["messages"], back, {"role": "tool", "content": "1776", "tool_call_id": "call_1_0"}],
                           "tools": tools})
    chat, ids, new_segment = turns.request(chat, stream, second)
    assert not new_segment
    stream += ids
    conversation = [*first["messages"], {"role": "assistant", "content": said}, {"role": "tool", "content": "1776", "tool_call_id": "call_1_0"}]
    assert stream == turns.render(conversation, tools)
    edited = chat_request({"messages": [first["messages"][1], back, second["messages"][-1]], "tools": tools})
    chat, ids, new_segment = turns.request(chat, stream, edited)
    assert new_segment and ids == turns.render(chat.seen, tools) and len(chat.sent) == 3


def test_without_a_template_an_agent_s_new_messages_are_appended_as_their_text():
    tok = _chat_tokenizer(CHAT)
    turns = PlainTurns(tok, 4)
    first = chat_request({"messages": [{"role": "user", "content": "37*48="}]})
    chat, stream, new_segment = turns.request(None, [], first)
    assert new_segment and stream == tok("37*48=")["input_ids"]  # as the feeder tokenizes a prompt
    stream += tok("calc(37*48)", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    back = turns.reply(chat, "calc(37*48)")
    assert back == {"role": "assistant", "content": "calc(37*48)"}
    second = chat_request({"messages": [*first["messages"], back, {"role": "tool", "content": " -> 1776\n"}]})
    chat, ids, new_segment = turns.request(chat, stream, second)
    assert not new_segment and ids == tok(" -> 1776\n", add_special_tokens=False)["input_ids"][:4]  # cut to 4 tokens
    again = chat_request({"messages": second["messages"][:2]})  # a retried call: no new message
    assert turns.request(chat, stream + ids, again)[2]


def test_an_agent_episode_trains_on_exactly_the_tokens_its_calls_returned(tiny_model, importable_tests, tmp_path):
    """The row of an agent's episode is, token for token, the prompt rendered once, each completion's ids as
    the client got them (mask 1, their logprobs and versions) and each tool message's tokens (mask 0).
    A call past env.max_turns, or longer than env.max_context_tokens, is refused: that episode ends as
    max_turns (max_context) with what the agent returned."""
    from rlflow.roles.config import RolloutConfig

    from transformers import AutoTokenizer

    from conftest import SAMPLING
    from rlflow.engines.hf import HFRolloutEngine
    from rlflow.roles.context import Timeline
    from rlflow.roles.episodes import Episode, Text, _answered, _turn

    env_cfg = EnvConfig(agent="user_envs.scripted_agent", kwargs={"log": str(tmp_path)}, workers=4, max_turns=3,
                        max_context_tokens=100)
    engine = HFRolloutEngine(tiny_model, RolloutConfig(device="cpu", dtype="float32", max_batch=64, seed=3))
    text, pool = Text(tiny_model, env_cfg, chat_template=False), EnvPool(env_cfg)
    records = {"ok": {"prompt": "123=", "turns": 2}, "long": {"prompt": "456=", "turns": 5}, "huge": {"prompt": "7" * 200},
               "short": {"prompt": "89=", "turns": 2, "max_tokens": 2}}
    live = {uid: Episode(uid, 0, [], record) for uid, record in records.items()}
    try:
        for uid, record in records.items():
            pool.reset(uid, record)
        deadline = time.monotonic() + 60
        while any(e.state != "finished" for e in live.values()):
            assert time.monotonic() < deadline, {uid: e.state for uid, e in live.items()}
            if ready := [e for e in live.values() if e.state == "generate"]:
                _turn(Timeline(), engine, ready, SAMPLING, pool, text)
            for out in pool.poll(0.05):
                _answered(live[out.episode], out, env_cfg, text, engine.version, pool)
    finally:
        pool.shutdown()
    logs = {log["prompt"]: log for log in (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for uid in ("ok", "short"):
        log = logs[records[uid]["prompt"]]
        ids = tok(records[uid]["prompt"])["input_ids"]
        mask = [0] * len(ids)
        for k, call in enumerate(log["calls"]):
            ids, mask = ids + call["token_ids"], mask + [1] * len(call["token_ids"])
            if k + 1 < len(log["calls"]):
                observation = tok(log["observations"][k], add_special_tokens=False)["input_ids"]
                ids, mask = ids + observation, mask + [0] * len(observation)
        row = live[uid].row(None)
        assert row["response_ids"] == ids and row["loss_mask"] == mask and row["segment_starts"] == [0]
        sampled = [i for i, m in enumerate(mask) if m]
        assert [row["rollout_logprobs"][i] for i in sampled] == [lp for c in log["calls"] for lp in c["logprobs"]]
        assert [f"rlflow-v{row['token_versions'][i]}" for i in sampled] == [c["version"] for c in log["calls"] for _ in c["token_ids"]]
        assert row["finish_reason"] == "done" and row["env_reward"] == len(sampled) and len(row["turn_starts"]) == 2
    assert all(len(c["token_ids"]) <= 2 for c in logs["89="]["calls"])  # max_tokens=2: each turn cut there
    long = live["long"].row(None)
    assert long["finish_reason"] == "max_turns" and long["env_reward"] == 0.0 and len(long["turn_starts"]) == 3
    huge = live["huge"].row(None)
    assert huge["finish_reason"] == "max_context" and huge["response_ids"] == [] and math.isnan(huge["env_reward"])


def test_a_stop_string_or_max_tokens_cuts_an_agent_turn_to_a_prefix_of_what_was_sampled(tiny_model):
    """The turn keeps the fewest sampled tokens whose text holds the stop string (the content ends before
    it), or the first max_tokens; what is kept is a prefix of what was sampled, logprobs with it."""
    from rlflow.engines.base import Generation
    from rlflow.roles.episodes import Text

    text = Text(tiny_model, EnvConfig(agent="user_envs.scripted_agent"), chat_template=False)
    ids = text.tok("12+34 Observation: 46", add_special_tokens=False)["input_ids"]
    g = Generation(ids, [-0.1 * k for k in range(len(ids))], "length")
    kept, logprobs, finish, content = text.cut(g, chat_request({"messages": [{"role": "user", "content": "q"}],
                                                                "stop": ["Observation:", "46"]}))
    assert content == "12+34 " and finish == "stop" and kept == ids[: len(kept)] and logprobs == g.logprobs[: len(kept)]
    assert len(text.action(kept)) > len(content) >= len(text.action(kept[:-1]))  # the fewest tokens reaching it
    kept, logprobs, finish, content = text.cut(g, chat_request({"messages": [{"role": "user", "content": "q"}],
                                                                "max_tokens": 3}))
    assert (kept, finish, content) == (ids[:3], "length", None)


from helpers import metrics, rlflow, said  # noqa: E402


def test_a_run_whose_episodes_are_openai_client_agents_trains_every_step_and_accounts_for_every_sample(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "data.task=reverse", "rollout.group_size=4", "actor.groups_per_step=4",
               "rollout.max_new_tokens=4", "env.agent=user_envs.scripted_agent", "env.max_turns=3", "env.workers=8",
               "flow.steps=3")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["episode/turns_mean"] == 2 and m["env/calls"] == 2 and m["env/failures"] == 0 for m in rows)
    samples = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert samples["consumed_more_than_once"] == samples["issued_not_consumed"] == samples["consumed_not_issued"] == 0


def test_a_run_whose_every_agent_fails_stops_naming_the_agent_and_its_error(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "data.task=reverse", "rollout.group_size=4", "actor.groups_per_step=4",
               "env.agent=user_envs.scripted_agent", "+env.kwargs.script=raise", "reward.max_failed_steps=2",
               "flow.steps=20")
    assert r.returncode == 1, r.stdout + r.stderr
    out = said(r)
    assert "every episode of the last 2 steps failed in its environment (env.agent=user_envs.scripted_agent)" in out
    assert "env_error): RuntimeError: the agent broke" in out and len(metrics(run_dir)) == 2
