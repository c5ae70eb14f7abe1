"""How an episode's token stream grows turn by turn, exactly: the rollout's side of text.

The rollout owns tokenization, so the tokens trained are the tokens the model saw. Two ways a stream grows:

- ``PlainTurns`` (no chat template: base models, the tiny model): an observation's tokens are its text's
  tokens, appended as they are.
- ``ChatTurns`` (``data.chat_template=true``): the conversation is kept as messages (the prompt as the
  user's, each turn as the assistant's, each observation as ``env.observation_role``), and after each
  observation the whole conversation is rendered with the tokenizer's chat template. The **exact-prefix
  rule**: if the tokens so far are a prefix of that rendering, only the new tokens are appended (the
  observation wrapped as the template wraps it). If they are not (the template rewrites history,
  say it drops earlier reasoning, or a turn's text does not re-tokenize to the tokens sampled), the
  stream is not rewritten. Instead a **new segment** starts: the whole rendering is appended as context,
  and the next turns are generated from it alone, as the model would see them in use. Each segment
  trains on exactly the tokens the model saw in it (``segment_starts``: the trainer scores each segment
  against its own context).

Both return, per observation, ``(ids to append, starts a new segment)``; the observation is cut to
``env.max_observation_tokens`` tokens before it is rendered.

An agent's chat calls (``env.agent``: ``envs/agent.py``) grow the stream by the same rules (``request``):
the replica keeps the conversation as the agent sees it (``AgentChat.sent``: its messages and our
replies) and as the model read it (``seen``: each of our replies as the text the model wrote). A call
whose messages extend ``sent`` appends the tokens of only the new messages (plain: their texts; chat:
under the exact-prefix rule); any other call (the first, an edited history, a retry) starts a new
segment with the whole conversation rendered. The model's own tokens are never re-tokenized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlflow.envs.agent import assistant_message


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template, the assistant's turn
    opened (the prompt of the next turn). transformers 5 returns an encoding, earlier versions a list."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclass
class AgentChat:
    """An agent episode's conversation (see the module docstring); messages in ``envs/agent.py``'s normal form."""

    sent: list[dict]
    seen: list[dict]
    tools: list[dict] | None
    calls: int = 0


class PlainTurns:
    def __init__(self, tokenizer, max_observation_tokens: int):
        self.tok, self.max_observation = tokenizer, max_observation_tokens

    parses_tools = False  # no template to show tools to the model, so none are parsed from its turns

    def start(self, record: dict) -> None:
        return None

    def cut(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"][: self.max_observation]

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A whole conversation as a model without a chat template reads it: its texts in order, tokenized
        as the feeder tokenizes a prompt."""
        return self.tok("".join(m["content"] for m in messages))["input_ids"]

    def extend(self, chat: AgentChat, stream: list[int], new: list[dict]) -> tuple[list[int], bool]:
        """The ids for messages ``new`` (already the tail of ``chat``) after ``stream``: their texts, each cut."""
        return [t for m in new for t in self.cut(m["content"])], False

    def request(self, chat: AgentChat | None, stream: list[int], request: dict) -> tuple[AgentChat, list[int], bool]:
        """An agent's chat call (``envs/agent.chat_request``): the conversation after it (a new AgentChat:
        ``chat`` is left as it was, so a call that is refused changes nothing), the ids to append and
        whether they start a new segment. ``stream``: the tokens of the current segment."""
        messages, tools = request["messages"], request["tools"]
        known = len(chat.sent) if chat is not None else 0
        if known and len(messages) > known and messages[:known] == chat.sent and tools == chat.tools:
            new = [dict(m) for m in messages[known:]]
            chat = AgentChat(chat.sent + messages[known:], chat.seen + new, tools, chat.calls)
            ids, new_segment = self.extend(chat, stream, new)
            return chat, ids, new_segment
        chat = AgentChat(list(messages), [dict(m) for m in messages], tools)
        return chat, self.render(chat.seen, tools), True

    def reply(self, chat: AgentChat, text: str, content: str | None = None) -> dict:
        """The model's turn ``text`` as the assistant message the agent gets (its ``content``, when a stop
        string cut it short of ``text``); both views of the conversation grow by it."""
        chat.calls += 1
        message = assistant_message(text if content is None else content, self.parses_tools and chat.tools is not None,
                                    f"call_{chat.calls}_")
        chat.sent.append(message)
        chat.seen.append({"role": "assistant", "content": text})
        return message

    def observation(self, conversation, stream: list[int], turn: str | None, text: str) -> tuple[list[int], bool]:
        """The ids to append for observation ``text`` after the model's ``turn`` (None: before the first
        turn), and whether they start a new segment."""
        return self.cut(text), False


class ChatTurns(PlainTurns):
    parses_tools = True  # tools go to the template; <tool_call> blocks come back as tool_calls

    def __init__(self, tokenizer, max_observation_tokens: int, role: str = "user"):
        super().__init__(tokenizer, max_observation_tokens)
        self.role = role

    def start(self, record: dict) -> list[dict]:
        """The conversation as the feeder rendered the prompt (``flow/launcher.make_tokenize``)."""
        return [{"role": "user", "content": record["prompt"]}]

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_ids(self.tok, [_template_form(m) for m in messages], tools)

    def extend(self, chat: AgentChat, stream: list[int], new: list[dict]) -> tuple[list[int], bool]:
        for m in new:
            m["content"] = self.tok.decode(self.cut(m["content"]))
        return _grow(stream, self.render(chat.seen, chat.tools))

    def observation(self, conversation: list[dict], stream: list[int], turn: str | None, text: str) -> tuple[list[int], bool]:
        """``stream``: the tokens the model has seen in this segment (its context and its turns)."""
        if turn is not None:
            conversation.append({"role": "assistant", "content": turn})
        conversation.append({"role": self.role, "content": self.tok.decode(self.cut(text))})
        return _grow(stream, self.render(conversation))


def _grow(stream: list[int], full: list[int]) -> tuple[list[int], bool]:
    """The exact-prefix rule: the new tail of ``full`` when ``stream`` is its prefix, else all of it as a
    new segment."""
    if full[: len(stream)] == stream:
        return full[len(stream):], False
    return full, True


def _template_form(m: dict) -> dict:
    """A normal-form message as chat templates take it: tool-call arguments as objects, not JSON text."""
    if "tool_calls" not in m:
        return m
    calls = []
    for c in m["tool_calls"]:
        try:
            arguments = json.loads(c["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            arguments = c["function"]["arguments"]
        calls.append({**c, "function": {**c["function"], "arguments": arguments}})
    return {**m, "tool_calls": calls}
