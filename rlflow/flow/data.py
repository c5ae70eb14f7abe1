"""Prompt data: a built-in task's endless stream, or a user's file, read and checked before any role starts.

A user's file (``data.path``: .jsonl, one JSON object per line, or .parquet) is read whole when the run
starts, in the launcher, so a malformed line fails the run before a process is started, with the file
and its line number (1-based, blank lines counted, as an editor shows them) and what is wrong there.
Every record must be an object holding ``data.prompt_key`` as non-empty text; its other fields reach
the reward function. The prompts are then tokenized once with the run's tokenizer (``check_tokens``):
a tokenizer that maps characters to its unknown token would silently train on other text than the
file's, so that is refused naming the line and the characters.

Then the records are served epoch after epoch, each epoch in a new seeded order (``prompt_records``):
the i-th record of the stream is the same in every run with the same seed, which is what resume relies on.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Iterator

from rlflow.flow.config import ConfigError
from rlflow.tasks.builtin import get_task


@dataclass
class Prompts:
    """A data file's checked records, and where in the file each one is (for messages)."""

    path: str
    records: list[dict]  # {"prompt": str, ...the file's other fields}
    where: list[str]  # "line 12" (jsonl) or "row 3" (parquet), one per record


def load_prompts(data) -> Prompts | None:
    """The records of ``data.path`` (a DataConfig), checked; None for a built-in task."""
    return None if data.path is None else read_prompts(data.path, data.prompt_key)


def read_prompts(path: str, prompt_key: str) -> Prompts:
    """A user's .jsonl or .parquet file as records ``{"prompt": str, ...other fields}``; a ConfigError
    names the file, the line (or row) and the fix."""
    rows = _parquet_rows(path) if path.endswith(".parquet") else _jsonl_rows(path)
    records, places = [], []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"data.path={path!r}, {where}: expected a JSON object ({{\"{prompt_key}\": ...}}), "
                              f"got {type(row).__name__}")
        if prompt_key not in row:
            raise ConfigError(f"data.path={path!r}, {where}: no {prompt_key!r} field (data.prompt_key); its fields "
                              f"are {sorted(row)}: set data.prompt_key to the one holding the prompt")
        prompt = row[prompt_key]
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"data.path={path!r}, {where}: the prompt ({prompt_key!r}) must be non-empty text, "
                              f"got {type(prompt).__name__} {str(prompt)[:60]!r}")
        records.append({**{k: v for k, v in row.items() if k != prompt_key}, "prompt": prompt})
        places.append(where)
    if not records:
        raise ConfigError(f"data.path={path!r} holds no records")
    return Prompts(path, records, places)


def _jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:  # bytes, decoded line by line, so an error names its own line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"data.path={path!r}, line {number}: not UTF-8 text ({e.reason} at column "
                                  f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.path={path!r}, line {number}: not valid JSON ({e.msg}, column {e.colno}): "
                                  f"{line.strip()[:80]!r}") from None


def _parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
        raise ConfigError(f"data.path={path!r}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def check_tokens(tokenizer, prompts: Prompts) -> None:
    """Refuse prompts the tokenizer cannot represent (characters it maps to its unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    texts = [r["prompt"] for r in prompts.records]
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if unk in ids:
            unknown = sorted({c for c in texts[i] if unk in tokenizer(c, add_special_tokens=False)["input_ids"]})
            raise ConfigError(f"data.path={prompts.path!r}, {prompts.where[i]}: the tokenizer has no token for "
                              f"{''.join(unknown)!r} (it would become {tokenizer.unk_token!r} and the model would "
                              f"train on other text than the file's): clean those characters from the data, or "
                              f"use a checkpoint whose tokenizer covers them")


REPLACEMENT_STREAM = 1  # ``prompt_records``' stream of dynamic sampling's replacement groups


def prompt_records(data, prompts: Prompts | None, stream: int = 0) -> Iterator[dict]:
    """Endless prompt records ``{"prompt": str, ...fields}``: the built-in task's stream, or the file's
    records (``load_prompts``) epoch after epoch, each epoch reshuffled by ``data.seed``. ``stream`` > 0:
    another such sequence, seeded apart (the replacements of dynamic sampling draw from stream 1)."""
    seed = data.seed + 1_000_003 * stream
    if prompts is None:
        task, rng = get_task(data.task), random.Random(seed)
        while True:
            yield task.make(rng, data.min_digits, data.max_digits)
    rng = random.Random(seed)
    for _ in itertools.count():
        order = list(range(len(prompts.records)))
        rng.shuffle(order)
        for i in order:
            yield prompts.records[i]
