"""The built-in engines on torch + transformers: CPU or GPU, any causal LM ``from_pretrained`` loads.

- ``HFRolloutEngine``: batched sampling with a KV cache (left-padded prompts, one forward per new
  token for the whole batch), per-token logprobs of the sampling distribution, weights swapped in place.
- ``HFTrainEngine``: fp32 master weights and AdamW; the actor loop accumulates gradients through
  ``token_logprobs`` and calls ``step`` once per policy version. With ``actor.parallel=fsdp`` the model
  is sharded over the trainer ranks (``engines/fsdp.py``); the methods below then are collectives
  every rank calls, and what is gathered whole lands on rank 0.
- With ``actor.lora`` both wrap the model with the same adapters (``engines/lora.py``): a policy version
  is then the adapters alone, which train, sync and checkpoint; the base stays as loaded.
- ``sequence_logprobs``: the one function that scores responses, shared by trainer and reference, so
  the two can never disagree on alignment or temperature.

Logprob convention everywhere: log softmax(logits / temperature) of the chosen token, before any top-p
or top-k cut. That is the distribution the trainer can compute, so π_θ/μ is exactly 1 on-policy when
top_p = 1 and top_k = 0 (the defaults).
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from rlflow.algo import segments
from rlflow.engines import fsdp, lora
from rlflow.engines.base import Generation, SamplingParams, Sequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str, device: str, attention: str | None = None):
    """``from_pretrained(path)`` in ``dtype`` on ``device``; ``attention``: transformers' attention kernel
    (``attn_implementation``, e.g. flash_attention_2; None: its default)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    kernel = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kernel)
    return model.to(device)


def enable_checkpointing(model) -> None:
    """Activation checkpointing, non-reentrant, by transformers' current name for it (``gradient_...``
    before 5.x's rename)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stop_token_ids(path: str) -> list[int]:
    """Every id that ends a response: the tokenizer's eos plus the generation config's (chat models add some)."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = set()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:  # no generation_config.json: the tokenizer's eos is all there is
        pass
    if not ids:
        raise ValueError(f"model at {path} has no eos token in its tokenizer or generation config")
    return sorted(ids)


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], temperature: float,
                      device: str, packed: bool = False) -> torch.Tensor:
    """[B, T] log π(y_t | prompt, y_<t) for every response token, zero past each response's end.

    ``packed`` (``actor.padding_free``): the sequences go end to end in one row with positions restarting
    at each, and no padding; transformers keeps them apart from the positions (a varlen kernel with
    flash attention, a block-causal mask otherwise). Same logprobs (``packing_honoured`` checks a model)."""
    if packed:
        return _packed_logprobs(model, prompts, responses, temperature, device)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, t_max = max(lengths), max(len(r) for r in responses)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):  # right padding: positions start at 0 for every row
        ids[i, : lengths[i]] = torch.tensor(p + r)
        mask[i, : lengths[i]] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
    # The logit at position j predicts token j + 1: response token t sits at len(p) + t.
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    pos = (start[:, None] + torch.arange(t_max, device=device)[None, :]).clamp(max=width - 2)  # [B, T]
    picked = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))  # [B, T, V]
    return _scored(picked, ids.gather(1, pos + 1), responses, temperature)


def _scored(picked: torch.Tensor, target: torch.Tensor, responses: list[list[int]], temperature: float) -> torch.Tensor:
    """[B, T] log softmax(``picked`` / T) at ``target``, the logits [B, T, V] that predict each response
    token; zero past each response's end."""
    picked = picked.float() / temperature
    logp = picked.gather(-1, target[:, :, None]).squeeze(-1) - torch.logsumexp(picked, -1)
    lengths = torch.tensor([len(r) for r in responses], device=picked.device)
    return logp * (torch.arange(picked.shape[1], device=picked.device)[None, :] < lengths[:, None])


def _packed_logprobs(model, prompts: list[list[int]], responses: list[list[int]], temperature: float,
                     device: str) -> torch.Tensor:
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).to(device)
    logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]  # [N, V]
    starts = torch.tensor([0] + [len(s) for s in seqs[:-1]]).cumsum(0)
    t_max = max(len(r) for r in responses)
    last = torch.tensor([max(len(r), 1) - 1 for r in responses])
    # response token t of sample i sits at starts[i] + len(p_i) + t; the logit before it predicts it
    t = torch.minimum(torch.arange(t_max)[None, :], last[:, None])
    pos = ((starts + torch.tensor([len(p) - 1 for p in prompts]))[:, None] + t).to(device)  # [B, T]
    return _scored(logits[pos], ids[pos + 1], responses, temperature)


@torch.no_grad()
def packing_honoured(model, device: str) -> bool:
    """Whether ``model``'s attention keeps packed sequences apart: two short sequences scored packed and
    padded give the same logprobs. A model whose attention ignores restarting positions (no packed-
    sequence support in its transformers class) would let one sample see another, silently."""
    prompts, responses = [[3, 4, 5, 6], [7, 8]], [[9, 10, 11], [12, 13, 14, 15]]
    padded = sequence_logprobs(model, prompts, responses, 1.0, device)
    packed = sequence_logprobs(model, prompts, responses, 1.0, device, packed=True)
    return bool(torch.allclose(padded, packed, atol=1e-3))


def _sample(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens [B], logprobs [B]) under softmax(logits / T)."""
    scaled = logits.float() / max(sampling.temperature, 1e-6)
    logp = torch.log_softmax(scaled, -1)  # [B, V]
    probs = logp.exp()
    if sampling.top_k > 0:
        kth = probs.topk(min(sampling.top_k, probs.shape[-1]), -1).values[:, -1:]
        probs = probs * (probs >= kth)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < sampling.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if sampling.temperature <= 1e-6:
        tokens = logits.argmax(-1)
    else:
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@dataclass
class _Batch:
    """The rows a continuous batch decodes (``HFRolloutEngine._stream``): their KV cache, attention mask
    (left-padded), last positions and next-token logits.

    Rows leave (``keep``) and join (``join``) without recomputing anyone's keys and values: the cache's
    tensors are indexed and concatenated along the batch, left-padded to a common width with masked
    positions, which attention gives zero weight. That needs a cache made of plain per-layer key and
    value tensors (``spliceable``: transformers' DynamicCache of full-attention layers); any other kind
    of cache is rebuilt instead (one forward pass over each live sequence)."""

    rows: list[int]  # the sequence in each row
    cache: object
    mask: torch.Tensor  # [B, L]
    pos: torch.Tensor  # [B] the position of each row's last token
    logits: torch.Tensor  # [B, V] the next token's logits

    def spliceable(self) -> bool:
        from transformers import DynamicCache

        layers = getattr(self.cache, "layers", None)
        return type(self.cache) is DynamicCache and bool(layers) and \
            all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None for layer in layers)

    def keep(self, rows: list[int]) -> _Batch:
        """Only ``rows`` (indices into this batch), and no column that every kept row pads."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # left padding every kept row has
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        return _Batch([self.rows[r] for r in rows], self.cache, mask[:, first:], self.pos[index], self.logits[index])

    def join(self, other: _Batch) -> _Batch:
        """This batch's rows, then ``other``'s, both caches left-padded to the wider."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            return torch.nn.functional.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        return _Batch(self.rows + other.rows, self.cache, torch.cat([pad(self.mask, 1), pad(other.mask, 1)]),
                      torch.cat([self.pos, other.pos]), torch.cat([self.logits, other.logits]))


class HFRolloutEngine:
    """Batched generation with a KV cache. ``max_batch`` sequences at a time bound the cache's memory.
    ``lora_cfg`` (the run's ``actor.lora``): the base gets the trainer's adapters, and versions replace them."""

    def __init__(self, model_path: str, cfg, lora_cfg=None):
        self.device = cfg.device
        self.model = load_model(model_path, cfg.dtype, cfg.device)
        if lora_cfg is not None:
            self.model = lora.wrap(self.model, lora_cfg)
        self.model.eval()
        self.stop_ids = torch.tensor(stop_token_ids(model_path), device=self.device)
        self.pad_id = 0  # any id works: padded positions are masked out of attention
        self.max_batch = cfg.max_batch
        self.kv_after_update = getattr(cfg, "kv_after_update", "recompute")  # rollout.update=in_flight (a user's
        # own config object may predate the field)
        self.version = 0
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed)
        # transformers 5 renamed the KV cache argument and output ``past_key_values`` -> ``cache``
        forward = lora.base_model(self.model).forward
        params = inspect.signature(forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # a prefill needs the last position's logits only: [B, V], not [B, L, V] (vocabularies of 150k)
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between: Callable[[int], list[list[int]] | None] | None = None,
                 finished: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """One response per prompt, ``max_batch`` sequences decoded at a time. With ``between``
        (rollout.update=in_flight, engines/base.py) the decoding is continuous instead: ``_stream``."""
        if between is not None:
            return self._stream(prompts, sampling, between, finished)
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch):
            out += self._generate(prompts[i : i + self.max_batch], sampling)
        return out

    def _prefill(self, sequences: list[list[int]], rows: list[int]) -> _Batch:
        """One forward pass over ``sequences``, left-padded so every row's next token is at the same
        column, filling a fresh KV cache: the batch of them (``rows``: the sequence in each row)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.last_logits)
        return _Batch(rows, out[self.cache_arg], mask, positions[:, -1], out.logits[:, -1])

    def _generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        """Decode one batch at the current version until every row stopped or reached max_new_tokens."""
        b = len(prompts)
        tokens = torch.zeros(b, sampling.max_new_tokens, dtype=torch.long, device=self.device)
        logps = torch.zeros(b, sampling.max_new_tokens, device=self.device)
        lengths = torch.full((b,), sampling.max_new_tokens, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        batch = self._prefill(prompts, list(range(b)))
        for t in range(sampling.max_new_tokens):
            tok, logp = _sample(batch.logits, sampling, self.gen)
            tokens[:, t], logps[:, t] = tok, logp
            stopped = ~done & torch.isin(tok, self.stop_ids)
            lengths[stopped] = t + 1
            done |= stopped
            if bool(done.all()) or t + 1 == sampling.max_new_tokens:
                break
            self._advance(batch, tok)
        tokens, logps, lengths = tokens.tolist(), logps.tolist(), lengths.tolist()
        done = done.tolist()
        return [Generation(tokens[i][: lengths[i]], logps[i][: lengths[i]], "stop" if done[i] else "length",
                           version=self.version) for i in range(b)]

    def _stream(self, prompts: list[list[int]], sampling: SamplingParams,
                between: Callable[[int], list[list[int]] | None],
                finished: Callable[[int, Generation], None] | None) -> list[Generation]:
        """Continuous decoding with in-flight updates.

        After every decode step ``between(running)`` is called (``running``: sequences live or queued
        here). It may apply a new version, which holds from the next token on, and may return more
        prompts, which join the batch. A sequence is handed to ``finished(index, generation)`` the moment
        it ends (index: its position among the prompts, those ``between`` gave numbered after the
        first ones), so its group need not wait for the batch's longest, and is then forgotten here (a
        call can last a whole run: nothing it handed over stays in memory); the call returns once
        nothing is live and ``between`` gives nothing more, with every generation not handed over
        (None in the places of those that were).

        The batch is spliced, not rebuilt (``_Batch``): joining prompts are prefilled alone and their
        keys and values appended to the cache (at most ``max_batch`` rows; more wait here and join
        once a quarter of the batch is free), and once half its rows have ended they are dropped
        from it. After an update under kv_after_update=recompute the batch is rebuilt, one forward
        pass over each live sequence so far, so the next logits are exactly the new policy's; under
        keep an update costs nothing and the next pass attends to keys and values the older weights
        computed. Every token records the version of the logits it was sampled from."""
        seqs: dict[int, Sequence] = {}  # the sequences not handed over, by index
        queue: list[int] = []  # sequences waiting for room in the batch
        stops, refill = set(self.stop_ids.tolist()), max(1, self.max_batch // 4)
        count = 0  # sequences so far: the next one's index

        def add(new: list[list[int]] | None) -> None:
            nonlocal count
            for p in new or ():
                queue.append(count)
                seqs[count] = Sequence(p)
                count += 1

        def open_(rows: list[int]) -> _Batch:
            return self._prefill([seqs[i].prompt + seqs[i].tokens for i in rows], rows)

        def forget(rows: list[int]) -> None:  # rows that left the batch: drop those handed over
            for i in rows:
                if seqs[i].handed:
                    del seqs[i]

        add(prompts)
        batch, carried = None, []  # carried: the live sequences a rebuild starts from
        while True:
            if batch is None:
                room = self.max_batch - len(carried)
                rows = carried + queue[:room]
                del queue[:room]
                if not rows:
                    return [seqs[i].generation() if i in seqs and not seqs[i].handed else None for i in range(count)]
                batch = open_(rows)
            else:
                live = [r for r, i in enumerate(batch.rows) if seqs[i].finish is None]
                if len(live) * 2 <= len(batch.rows):  # half the rows ended: stop decoding them
                    kept = set(live)
                    forget([i for r, i in enumerate(batch.rows) if r not in kept])
                    batch = batch.keep(live) if batch.spliceable() else open_([batch.rows[r] for r in live])
                room = self.max_batch - len(batch.rows)
                if queue and room >= min(refill, len(queue)):
                    joining = queue[:room]
                    del queue[:room]
                    if batch.spliceable():
                        batch = batch.join(open_(joining))
                    else:  # rebuilt from the live rows and the joining ones
                        forget([i for i in batch.rows if seqs[i].finish is not None])
                        batch = open_([i for i in batch.rows if seqs[i].finish is None] + joining)
            tok, logp = _sample(batch.logits, sampling, self.gen)
            for i, t, lp in zip(batch.rows, tok.tolist(), logp.tolist()):
                s = seqs[i]
                if s.finish is not None:
                    continue
                s.add(t, lp, self.version)
                if t in stops or len(s.tokens) == sampling.max_new_tokens:
                    s.finish = "stop" if t in stops else "length"
                    if finished is not None:
                        finished(i, s.generation())
                        s.handed = True  # forgotten as soon as the batch drops its row
            version, live = self.version, [i for i in batch.rows if seqs[i].finish is None]
            add(between(len(live) + len(queue)))
            if not live or (self.version != version and self.kv_after_update == "recompute"):
                forget([i for i in batch.rows if seqs[i].finish is not None])
                batch, carried = None, live  # rebuilt (under the new weights) before the next token
            else:
                self._advance(batch, tok)

    def _advance(self, batch: _Batch, tok: torch.Tensor) -> None:
        """One decode step of every row of ``batch``: ``tok`` [B] appended, the next logits computed."""
        batch.mask = torch.cat([batch.mask, torch.ones(len(tok), 1, dtype=batch.mask.dtype, device=self.device)], 1)
        batch.pos = batch.pos + 1
        out = self.model(input_ids=tok[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                         **{self.cache_arg: batch.cache}, use_cache=True)
        batch.cache, batch.logits = out[self.cache_arg], out.logits[:, -1]

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        load_parameters(self.model, weights)
        self.version = version

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live policy tensors (tied ones once; the adapters alone with LoRA): weight patches are
        scattered into them in place."""
        return {name: p.data for name, p in lora.policy(self.model).items()}


def load_parameters(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's policy parameters in place (every parameter, or the adapters of a
    model with LoRA: ``engines/lora.policy``); the names must match exactly."""
    params = lora.policy(model)
    if params.keys() != weights.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


class HFTrainEngine:
    """fp32 master weights and AdamW. Gradients accumulate across ``token_logprobs`` backward passes.

    Sharded (``cfg.parallel == "fsdp"``): built after the trainer ranks' process group; ``step``,
    ``weights``, ``snapshot``, ``restore`` and ``gathered_views`` are collectives.

    LoRA (``cfg.lora.rank`` > 0): the model is wrapped before sharding (``engines/lora.py``) and the
    optimizer, ``weights``, ``shard_weights`` and checkpoints cover the adapters only."""

    def __init__(self, model_path: str, cfg, sampling: SamplingParams):
        """``cfg``: the ActorConfig; ``sampling``: the rollout's, whose temperature the logprobs are taken at."""
        self.device = cfg.device
        self.temperature = sampling.temperature
        self.model_path = model_path
        self.sharded = getattr(cfg, "parallel", "replicate") == "fsdp"
        self.lora_cfg = getattr(cfg, "lora", None)
        self.lora = bool(self.lora_cfg is not None and self.lora_cfg.enabled)
        self.packed = getattr(cfg, "padding_free", False)
        attention = getattr(cfg, "attn_implementation", None)
        checkpointing = getattr(cfg, "activation_checkpointing", False)

        def prepare(model):
            if checkpointing:  # recompute each layer's activations in backward: one layer's held, not all
                enable_checkpointing(model)
            return lora.wrap(model, self.lora_cfg) if self.lora else model

        if self.sharded:  # rank 0 reads the weights, every rank ends with its own rows on the device
            self.model, self.world = fsdp.load_model(model_path, cfg.device, cfg.param_dtype, prepare, attention)
        else:
            self.model, self.world = prepare(load_model(model_path, "float32", cfg.device, attention).train()), 1
        if self.packed and not packing_honoured(self.model, self.device):  # every rank alike (a collective)
            raise ValueError(f"actor.padding_free=true: {type(lora.base_model(self.model)).__name__} with attention "
                             f"{lora.base_model(self.model).config._attn_implementation!r} does not keep packed "
                             f"sequences apart (packed and padded logprobs differ): set actor.padding_free=false, or "
                             f"another actor.attn_implementation")
        # sharded checkpoints: written in the background over a group of their own, one write in flight
        self.save_group = fsdp.checkpoint_group() if self.sharded else None
        self.saving = None  # the sharded write in flight (its future)
        self.tokenizer = None  # loaded at the first snapshot, and kept: model_path may be a pruned checkpoint by then
        self.max_grad_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.version = 0

    def token_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return sequence_logprobs(self.model, prompts, responses, self.temperature, self.device, self.packed)

    def step(self, grad_scale: float, lr_scale: float = 1.0, advance: bool = True) -> dict[str, float]:
        """One AdamW step at lr x ``lr_scale``; the base learning rates are restored whatever happens.
        ``advance=False``: a minibatch step within a version (the version moves on with the last)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:  # sharded: FSDP averaged the ranks' sums; x world makes them the sum again
            p.grad.mul_(grad_scale * self.world)
        norm = fsdp.scalar(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        base = [g["lr"] for g in self.optimizer.param_groups]
        try:
            for g, lr in zip(self.optimizer.param_groups, base):
                g["lr"] = lr * lr_scale
            self.optimizer.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, base):
                g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.version += advance
        return {"actor/grad_norm": norm, "lr/effective": base[0] * lr_scale}

    def trajectory_grad_sq(self, prompts: list[list[int]], responses: list[list[int]],
                           masks: list[list[int]] | None = None,
                           segment_starts: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] ‖∇_θ log π_θ(response_i)‖², [B] log π_θ(response_i)), one forward and backward per sample;
        with ``masks`` (multi-turn episodes) only the tokens marked 1 count, each segment scored against
        its own context (``algo/segments.py``).

        Uses ``torch.autograd.grad``, so the gradients the step is accumulating are untouched. The cost is
        one extra single-sample pass per trajectory (OPOB's price); memory stays that of one sample.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_sq, seq_logp = [], []
        for k, (p, r) in enumerate(zip(prompts, responses)):
            logp = segments.score(self.token_logprobs, [p], [r], [segment_starts[k]] if segment_starts else None)
            if masks is not None:
                logp = logp * torch.tensor(masks[k], dtype=logp.dtype, device=logp.device)[None, :]
            logp = logp.sum()
            grads = torch.autograd.grad(logp, params, allow_unused=True)
            grad_sq.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
            seq_logp.append(float(logp.detach()))
        return torch.tensor(grad_sq, dtype=torch.float64), torch.tensor(seq_logp, dtype=torch.float64)

    def gradients(self) -> list[torch.Tensor]:
        """Every trainable parameter's accumulated gradient, zeros where nothing flowed (for all-reduce)."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.model.parameters() if p.requires_grad]

    def weights(self) -> dict[str, torch.Tensor]:
        """name -> parameter (tied ones once; the adapters alone with LoRA). Sharded: the whole of them in
        rank 0's host memory, gathered one tensor at a time, and an empty dict on the other ranks."""
        if not self.sharded:
            return {name: p.detach() for name, p in lora.policy(self.model).items()}
        return self._gathered()[0]

    def _gathered(self, optimizer=None) -> tuple[dict[str, torch.Tensor], dict | None]:
        """(the policy's tensors by name, whole, and ``optimizer``'s state keyed by name) in host memory: on
        rank 0 of a sharded model (``{}`` elsewhere: a collective), copied from a plain one. With LoRA the
        frozen base is never gathered, nor a frozen tied weight's alias."""
        state, optim = fsdp.full_state(self.model, optimizer, frozen=not self.lora)
        return ({name: state[name] for name in lora.policy(self.model)} if state else {}), optim

    def shard_weights(self):
        """(this rank's rows of every policy parameter, their [start, stop) rows, every whole shape): what a
        sharded rank publishes itself (``engines/fsdp.local_rows``)."""
        return fsdp.local_rows(self.model, set(lora.policy(self.model)))

    def gathered_views(self):
        """(name, whole parameter) in name order, gathered on every rank one at a time (for checks)."""
        return fsdp.full_views(self.model)

    def save(self, path: str) -> None:
        """A self-contained checkpoint: the model and the start checkpoint's tokenizer (``from_pretrained``)."""
        os.makedirs(path, exist_ok=True)
        self.snapshot(f"{path}.dcp" if self.sharded else None, whole=True)(path)

    def snapshot(self, staging: str | None = None, whole: bool = False) -> Callable[[str], None]:
        """Copy the weights and the optimizer state to host memory now; return a function that writes them
        (model + tokenizer as ``from_pretrained`` reads them, and ``optimizer.pt``) to a directory later.

        The optimizer state is keyed by parameter name and whole (``engines/fsdp.full_state``), so a
        checkpoint resumes on any number of ranks, sharded or not.

        Sharded: every rank stages its own rows and writes them to ``staging`` (a directory every rank can
        reach) in the background (``engines/fsdp.save_sharded``); rank 0's writer waits for that write,
        which ends once every rank's rows are written, moves it to ``dcp/`` of the checkpoint and adds
        the config and tokenizer, and with ``whole`` the model gathered to rank 0 (``from_pretrained``: the
        run's end). The step waits only for the staging, and for the previous write if it is still going.

        LoRA: the adapters and their optimizer state, gathered (``_adapter_snapshot``), sharded or not."""
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.lora:
            return self._adapter_snapshot()
        if self.sharded:
            return self._sharded_snapshot(staging, whole)
        weights, optimizer = fsdp.full_state(self.model, self.optimizer)
        model, tokenizer = self.model, self.tokenizer

        def write(path: str) -> None:
            model.save_pretrained(path, state_dict=weights)
            tokenizer.save_pretrained(path)
            torch.save(optimizer, f"{path}/optimizer.pt")

        return write

    def _adapter_snapshot(self) -> Callable[[str], None]:
        """A LoRA checkpoint: ``adapter/`` (peft's files, naming this run's start model as the base), the
        adapters' optimizer state keyed by name (``optimizer.pt``), and the base's config and tokenizer.
        Adapters are small, so they are gathered to rank 0 even when sharded (no DCP): the checkpoint
        loads on any number of ranks. Merging is not a checkpoint's business: ``train/checkpoint.export``."""
        weights, optimizer = self._gathered(self.optimizer)  # a collective when sharded
        if not weights:  # a sharded rank other than 0
            return lambda path: None
        cfg, base, tokenizer = self.lora_cfg, self.model_path, self.tokenizer
        model = lora.base_model(self.model)

        def write(path: str) -> None:
            lora.save_adapter(weights, cfg, base, f"{path}/adapter")
            torch.save(optimizer, f"{path}/optimizer.pt")
            save_config(model, path)  # the base's: what the checkpoint applies to
            tokenizer.save_pretrained(path)

        return write

    def _sharded_snapshot(self, staging: str | None, whole: bool) -> Callable[[str], None]:
        if staging is None:
            raise ValueError("a sharded snapshot is staged in a directory every rank writes to: pass staging")
        if self.saving is not None:  # one write in flight: a slow disk costs steps time, not memory
            self.saving.result()
        weights = fsdp.full_state(self.model)[0] if whole else {}  # a collective; whole on rank 0 only
        self.saving = saving = fsdp.save_sharded(self.model, self.optimizer, staging, self.save_group)
        model, tokenizer = self.model, self.tokenizer
        if dist_rank() != 0:
            return lambda path: saving.result()

        def write(path: str) -> None:
            try:
                saving.result()  # rank 0 coordinates the write: done once every rank's rows are on disk
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            os.replace(staging, f"{path}/dcp")
            if weights:
                model.save_pretrained(path, state_dict=weights)
            else:
                save_config(model, path)
            tokenizer.save_pretrained(path)

        return write

    def restore(self, path: str, version: int) -> None:
        """Continue from checkpoint ``path`` (this engine was built from it, so the weights are already
        loaded): the optimizer state, and ``version``. Sharded, rank 0 reads the file and sends each rank
        its rows. A sharded checkpoint (``dcp/``) loads weights and optimizer state however this trainer
        is sharded now, or not at all (the engine was then built from the run's start model). A LoRA
        checkpoint's adapters load into the start model's adapters (``_restore_adapters``)."""
        if self.lora:
            self._restore_adapters(path)
        elif os.path.isdir(f"{path}/dcp"):
            fsdp.load_sharded(self.model, self.optimizer, f"{path}/dcp", self.save_group)
            self.version = version
            return
        # tensors only: no code runs. Sharded, every rank maps the file (nothing is read whole) so that all
        # decide alike, and rank 0's state is then copied to every rank's rows.
        state = torch.load(f"{path}/optimizer.pt", map_location="cpu" if self.sharded else self.device,
                           weights_only=True, mmap=self.sharded)
        if any(isinstance(k, int) for g in state.get("param_groups", []) for k in g.get("params", [])):
            if self.sharded:  # keyed by position (checkpoints of earlier rlflow): loads unsharded only
                raise ValueError(f"{path}/optimizer.pt keys its state by parameter position (written by an "
                                 f"earlier rlflow): resume it with actor.parallel=replicate")
            self.optimizer.load_state_dict(state)
        elif state.get("state"):  # empty: no update happened before the checkpoint, the fresh state is right
            fsdp.load_optimizer(self.model, self.optimizer, state if not self.sharded or dist_rank() == 0 else None)
        self.version = version

    def _restore_adapters(self, path: str) -> None:
        """Load ``path/adapter`` into this model's adapters. Every rank reads the file (a few MB), so all
        refuse a mismatch alike, and a sharded rank keeps its own rows of each."""
        directory = f"{path}/adapter"
        if not os.path.isdir(directory):
            raise ValueError(f"{path} holds no adapter/: it is a checkpoint of a run without LoRA, which does not "
                             f"resume with actor.lora.rank={self.lora_cfg.rank}")
        weights = lora.load_adapter(directory)
        ours = lora.policy(self.model)
        if weights.keys() != ours.keys() or any(tuple(weights[k].shape) != tuple(p.shape) for k, p in ours.items()):
            raise ValueError(f"the adapters in {directory} do not fit this model's (actor.lora rank "
                             f"{self.lora_cfg.rank}, target_modules {list(self.lora_cfg.target_modules)}): "
                             f"resume with the settings the checkpoint was written with")
        if self.sharded:
            fsdp.load_full(self.model, weights)
        else:
            load_parameters(self.model, weights)


def save_config(model, path: str) -> None:
    """A model's config and generation config, without its weights (they are elsewhere in the checkpoint)."""
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
