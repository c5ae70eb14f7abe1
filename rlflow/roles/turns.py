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
"""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template, the assistant's turn
    opened (the prompt of the next turn). transformers 5 returns an encoding, earlier versions a list."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class PlainTurns:
    def __init__(self, tokenizer, max_observation_tokens: int):
        self.tok, self.max_observation = tokenizer, max_observation_tokens

    def start(self, record: dict) -> None:
        return None

    def cut(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"][: self.max_observation]

    def observation(self, conversation, stream: list[int], turn: str | None, text: str) -> tuple[list[int], bool]:
        """The ids to append for observation ``text`` after the model's ``turn`` (None: before the first
        turn), and whether they start a new segment."""
        return self.cut(text), False


class ChatTurns(PlainTurns):
    def __init__(self, tokenizer, max_observation_tokens: int, role: str = "user"):
        super().__init__(tokenizer, max_observation_tokens)
        self.role = role

    def start(self, record: dict) -> list[dict]:
        """The conversation as the feeder rendered the prompt (``flow/launcher.make_tokenize``)."""
        return [{"role": "user", "content": record["prompt"]}]

    def render(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tok, messages)

    def observation(self, conversation: list[dict], stream: list[int], turn: str | None, text: str) -> tuple[list[int], bool]:
        """``stream``: the tokens the model has seen in this segment (its context and its turns)."""
        if turn is not None:
            conversation.append({"role": "assistant", "content": turn})
        conversation.append({"role": self.role, "content": self.tok.decode(self.cut(text))})
        full = self.render(conversation)
        if full[: len(stream)] == stream:
            return full[len(stream):], False
        return full, True
