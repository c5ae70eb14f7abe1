"""A tiny causal LM built on this machine: a byte tokenizer, a Qwen2-shaped model, a short warm-start.

Why it exists: the default recipe must learn visibly on a CPU in minutes with no model download. The
result is an ordinary Hugging Face checkpoint directory, so everything downstream uses the same
``from_pretrained(path)`` path a real checkpoint takes.

Why a warm-start: a random-init policy almost never emits a well-formed answer, so a verifiable reward
carries no signal. ``warmup_steps`` of supervised training on the task's demonstrations teaches the
format and a little of the task (mean reward ~0.2 on ``reverse``); RL has to do the rest.

Its tokenizer has one token per byte (GPT-2's byte-to-character map, no merges): every text has
tokens, none is dropped or mapped to <unk>, and an ASCII character is one token. It is saved so that
it loads the same whichever class ``AutoTokenizer`` picks for a Qwen2 checkpoint (transformers 5
rebuilds it as ``Qwen2Tokenizer``, a byte-level BPE: with this vocabulary the same ids come out).

What the warm-start learns from (``Demos``): a built-in task's generator, or the records of a user's
data file when they carry a demonstration answer (``model.tiny.answer_key``); data without one gets no
warm-start (the policy starts random, and the run says so).

Built once and cached: the directory name is a hash of everything that shapes the weights. Building
writes to a temporary directory and renames it into place, so a crashed build is never mistaken for
a finished one and two concurrent builds cannot mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from rlflow.engines.config import TinyModelConfig

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3; byte b is id 4 + b
TOKENIZER = "bytes-v1"  # in the cache key: a model built for another vocabulary is another model


@dataclass
class Demos:
    """What the warm-start learns from."""

    name: str  # part of the cache directory's name: tiny-<name>-<hash>
    identity: str  # everything about the demonstrations that shapes the weights (in the cache key)
    sample: Callable[[random.Random], dict] | None  # rng -> {"prompt": str, "answer": str} or, multi-turn,
    # {"prompt": str, "turns": [(who, text), ...]} (``tasks/builtin.Task.demo``); None: no warm-start


def task_demos(task: str, min_digits: int, max_digits: int) -> Demos:
    """A built-in task's endless demonstrations."""
    from rlflow.tasks.builtin import get_task

    spec = get_task(task)

    def sample(rng: random.Random) -> dict:
        record = spec.make(rng, min_digits, max_digits)
        return record if spec.demo is None else {"prompt": record["prompt"], "turns": spec.demo(rng, record)}

    # What the demonstrations are, not only their name: a change to a task's generator or demonstrations
    # (or a constant they read) changes these samples, and so the cache key, and the model is rebuilt.
    rng = random.Random(0)
    fingerprint = hashlib.sha256(json.dumps([sample(rng) for _ in range(64)]).encode()).hexdigest()[:16]
    return Demos(task, json.dumps([task, min_digits, max_digits, fingerprint]), sample)


def data_demos(records: list[dict], answer_key: str) -> Demos:
    """A data file's records (``prompt`` plus fields) as demonstrations, when they carry ``answer_key`` text."""
    pairs = [(r["prompt"], r[answer_key]) for r in records if isinstance(r.get(answer_key), str)]
    if not pairs:
        return Demos("data", f"data without {answer_key!r}: {len(records)} records", None)
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return Demos("data", f"{answer_key}: {digest}", lambda rng: dict(zip(("prompt", "answer"), rng.choice(pairs))))


def mixed_demos(parts: list[Demos], weights: list[float]) -> Demos:
    """A mixture's demonstrations (``data.sources``): each sample from one source's, drawn by weight
    (sources without demonstrations left out; none at all: no warm-start)."""
    kept = [(d, w) for d, w in zip(parts, weights) if d.sample is not None]
    identity = "; ".join(f"{w:g} x {d.name}: {d.identity}" for d, w in zip(parts, weights))
    if not kept:
        return Demos("mix", identity, None)

    def sample(rng: random.Random) -> dict:
        return rng.choices([d for d, _ in kept], [w for _, w in kept])[0].sample(rng)

    return Demos("mix", identity, sample)


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per byte of the (NFC-normalised) text, <bos> prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> symbol map

    symbols = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [symbols[b] for b in range(256)])}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.normalizer = normalizers.NFC()  # as Qwen2Tokenizer does, so both load paths give the same ids
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


BUILD_MARK = "rlflow_build.json"  # written into a built model's directory: what it was built from


class ByteTokenizerFile:
    """The byte tokenizer of a model built here, read with the ``tokenizers`` library alone.

    The launcher tokenizes prompts and decodes samples while the roles' forkserver imports torch and
    transformers on another core; reading the tokenizer this way keeps the launcher from importing
    them too (``AutoTokenizer`` imports torch: a second of CPU at start). It is the object the model was
    warm-started with (``byte_tokenizer``), and ``AutoTokenizer`` gives the same ids and texts for
    this checkpoint (``tests/test_engines.py`` pins that). The subset of the Hugging Face tokenizer
    call the launcher uses: ``tok(text or texts, add_special_tokens)``, ``decode``, ``unk_token_id``."""

    unk_token_id = None  # one token per byte: no text has a character without a token

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))

    @staticmethod
    def of(path: str) -> "ByteTokenizerFile | None":
        """The tokenizer of ``path`` when it is a model built here with this byte tokenizer (else None)."""
        try:
            return ByteTokenizerFile(path) if json.loads((Path(path) / BUILD_MARK).read_text())["tokenizer"] == TOKENIZER \
                else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, str):
            return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self._tok.encode_batch(text, add_special_tokens=add_special_tokens)]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlflow" / "models"


def build_tiny_model(cfg: TinyModelConfig, demos: Demos, cache_dir: str | None = None, log=print) -> str:
    """Return the path of the tiny checkpoint for this config, building and caching it if needed.

    Finding it in the cache imports neither torch nor transformers (the launcher stays torch-free)."""
    model = {**asdict(cfg), "answer_key": None}  # where the answers came from is in ``demos.identity``
    key = json.dumps({"model": model, "demos": demos.identity, "tokenizer": TOKENIZER,
                      "transformers": version("transformers")}, sort_keys=True)
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"tiny-{demos.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return str(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        warm = f"{cfg.warmup_steps} warm-start steps on {demos.name!r}" if demos.sample and cfg.warmup_steps \
            else "no warm-start: the policy starts random"
        log(f"building the tiny model once ({cfg.num_layers} layers x {cfg.hidden_size}, {warm}) -> {path}")
        _build(cfg, demos, tmp)
        (tmp / BUILD_MARK).write_text(key)
        try:
            os.rename(tmp, path)
        except OSError:  # a concurrent build finished first: theirs is identical, keep it
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _build(cfg: TinyModelConfig, demos: Demos, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen2Config

    transformers.logging.disable_progress_bar()

    torch.manual_seed(cfg.seed)
    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=len(SPECIAL) + 256, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    model.train()
    for _ in range(cfg.warmup_steps if demos.sample else 0):
        records = [demos.sample(rng) for _ in range(cfg.warmup_batch)]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in records]
        # (ids, trained) pieces after the prompt: the answer and its <eos>, or each turn of a demonstration
        pieces = [[(tokenizer(text, add_special_tokens=False)["input_ids"] + ([2] if who == "model" else []), who == "model")
                   for who, text in r.get("turns", [("model", r.get("answer"))])] for r in records]
        width = max(len(p) + sum(len(ids) for ids, _ in ps) for p, ps in zip(prompts, pieces))
        ids = torch.zeros(len(records), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)  # loss on the model's turns and their <eos> only
        for i, (p, ps) in enumerate(zip(prompts, pieces)):
            ids[i, : len(p)] = torch.tensor(p)
            at = len(p)
            for piece, trained in ps:
                ids[i, at: at + len(piece)] = torch.tensor(piece)
                if trained:
                    labels[i, at: at + len(piece)] = torch.tensor(piece)
                at += len(piece)
        model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
