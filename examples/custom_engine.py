"""A custom rollout engine, plugged in by dotted path — no fork of rlflow needed.

    rlflow rollout.engine=examples.custom_engine.NoCacheEngine flow.steps=50
    python -m examples.custom_engine          # the same, 50 steps, no W&B

An engine is a class built as ``Engine(model_path, cfg)`` (cfg: ``rlflow.roles.config.RolloutConfig``) with a
``version`` attribute, ``generate(prompts, sampling) -> list[Generation]`` and
``load_weights(weights, version)``; see ``engines/base.py``. This one samples without a KV cache:
it re-runs the whole sequence for every new token. That is slower, but works for any model whose
forward takes only ``input_ids`` and ``attention_mask`` — a starting point for wrapping your own.
The logprob it records must be that of softmax(logits / temperature), the distribution the actor scores.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlflow.engines.hf import load_parameters
from rlflow.engines.base import Generation, SamplingParams


class NoCacheEngine:
    def __init__(self, model_path: str, cfg):
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(cfg.device).eval()
        self.device = cfg.device
        self.eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
        self.gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.version = 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        return [self._one(p, sampling) for p in prompts]

    def _one(self, prompt: list[int], sampling: SamplingParams) -> Generation:
        ids, out, logps = list(prompt), [], []
        for _ in range(sampling.max_new_tokens):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1]
            logp = torch.log_softmax(logits.float() / sampling.temperature, -1)
            token = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
            ids.append(token)
            out.append(token)
            logps.append(float(logp[token]))
            if token == self.eos:
                return Generation(out, logps, "stop")
        return Generation(out, logps, "length")

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        load_parameters(self.model, weights)
        self.version = version


if __name__ == "__main__":
    import sys

    from rlflow.flow.cli import main

    sys.exit(main(["rollout.engine=examples.custom_engine.NoCacheEngine", "flow.steps=50", "tracking.wandb=false",
                   *sys.argv[1:]]))
