"""Prompt data: a built-in task's endless stream, or a user's file, read and checked before any role starts.

A user's file (``data.path``: .jsonl, one JSON object per line, .parquet, or a directory a Hugging Face
``datasets`` Dataset or DatasetDict was saved to with ``save_to_disk``: its Arrow files are read with
pyarrow, so the ``datasets`` package is not needed) is read whole when the run starts, in the launcher,
so a malformed line fails the run before a process is started, with the file
and its line number (1-based, blank lines counted, as an editor shows them) and what is wrong there.
Every record must be an object holding ``data.prompt_key`` as non-empty text; its other fields reach
the reward function. The prompts are then tokenized once with the run's tokenizer (``check_tokens``):
a tokenizer that maps characters to its unknown token would silently train on other text than the
file's, so that is refused naming the line and the characters.

Then the records are served epoch after epoch, each epoch in a new seeded order (``prompt_records``):
the i-th record of the stream is the same in every run with the same seed, which is what resume relies on.

A mixture (``data.sources``): each source is loaded and checked the same way (``load_sources``) and has
its own seeded stream; a seeded draw picks each record's source with probability its weight over the
sum, and the record carries the source's name as ``data_source`` (the reward role picks the source's
reward by it, the actor reports metrics per source). The mixture is as replayable as one stream.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass
from typing import Iterator

from rlflow.flow.config import ConfigError
from rlflow.roles.schema import SOURCE_KEY
from rlflow.tasks.builtin import get_task


@dataclass
class Prompts:
    """A data file's checked records, and where in the file each one is (for messages)."""

    path: str
    records: list[dict]  # {"prompt": str, ...the file's other fields}
    where: list[str]  # "line 12" (jsonl) or "row 3" (parquet), one per record




def load_sources(data) -> list[Prompts | None]:
    """Each of ``data.sources``' records, checked (None for a built-in task's source)."""
    return [None if s.path is None else read_prompts(s.path, s.prompt_key, s.split) for s in data.sources]


def load_prompts(data) -> Prompts | None:
    """The records of ``data.path`` (a DataConfig), checked; None for a built-in task."""
    return None if data.path is None else read_prompts(data.path, data.prompt_key, data.split)


def read_prompts(path: str, prompt_key: str, split: str = "train") -> Prompts:
    """A user's .jsonl or .parquet file, or saved datasets directory (its ``split`` when it holds several),
    as records ``{"prompt": str, ...other fields}``; a ConfigError names the file, the line (or row) and
    the fix."""
    if os.path.isdir(path):
        rows = _saved_dataset_rows(path, split)
    else:
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


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory ``datasets``' ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _saved_dataset_rows(path: str, split: str) -> Iterator[tuple[str, object]]:
    """The rows of a saved Dataset (``state.json`` lists its Arrow stream files, in order), or of one split
    of a saved DatasetDict (``dataset_dict.json`` lists the splits, each a Dataset directory)."""
    import pyarrow as pa

    if not is_saved_dataset(path):
        raise ConfigError(f"data.path={path!r} is a directory but not one `datasets` saved (no state.json or "
                          f"dataset_dict.json): give a .jsonl or .parquet file, or a save_to_disk directory")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise ConfigError(f"data.path={path!r} holds the splits {splits}, not {split!r}: set data.split to one of them")
        path = os.path.join(path, split)
    with open(os.path.join(path, "state.json")) as f:
        files = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    row = 0
    for name in files:
        try:
            with pa.ipc.open_stream(os.path.join(path, name)) as reader:
                for batch in reader:
                    for record in batch.to_pylist():
                        yield f"row {row}", record
                        row += 1
        except (OSError, pa.ArrowInvalid) as e:
            raise ConfigError(f"data.path={path!r}: {name} is not a readable Arrow file ({e})") from None


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
    if data.sources:
        yield from _mixture(data, prompts, seed)
        return
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


def _mixture(data, loaded: list[Prompts | None], seed: int) -> Iterator[dict]:
    """``data.sources`` mixed by weight (``loaded``: ``load_sources``): each source's own stream, seeded
    apart, and a seeded draw of the source of each record."""
    streams = []
    for k, (source, prompts) in enumerate(zip(data.sources, loaded)):
        one = type(data)(task=source.task, path=source.path, prompt_key=source.prompt_key, split=source.split,
                         min_digits=data.min_digits, max_digits=data.max_digits, seed=seed + 7919 * (k + 1))
        streams.append(prompt_records(one, prompts))
    rng, weights = random.Random(seed), [s.weight for s in data.sources]
    while True:
        k = rng.choices(range(len(streams)), weights)[0]
        yield {**next(streams[k]), SOURCE_KEY: data.sources[k].name}
