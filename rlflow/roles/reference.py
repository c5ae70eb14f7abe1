"""The reference role: per-token logprobs of the frozen start policy, for the KL term.

Loop contract (started only when ``actor.kl_coef > 0``):
- consumes: rows with ``prompt_ids`` and ``response_ids`` (episodes: and ``segment_starts``, each segment
  scored against its own context: ``algo/segments.py``)
- produces: ``ref_logprobs`` ([T] float32, aligned with ``response_ids``)
- waits for: responses (idle is normal)
- unblocked by: the rollouts' puts

The reference model is the run's version-0 checkpoint and never changes; it is scored with the same
``sequence_logprobs`` and temperature as the actor, so the KL is zero at the start of a run.
"""

from __future__ import annotations

import time

import torch

from rlflow.roles import schema
from rlflow.algo import segments
from rlflow.engines.hf import load_model, sequence_logprobs
from rlflow.roles import reports
from rlflow.roles.config import ReferenceArgs, ReferenceConfig
from rlflow.roles.context import RoleContext, ack_work, next_rows


def serve(cfg: ReferenceConfig, ctx: RoleContext, args: ReferenceArgs) -> None:
    """Score the reference logprobs of each response off the bus (the KL term's anchor)."""
    model = load_model(ctx.model_path, cfg.dtype, cfg.device).eval()
    ctx.report(reports.READY)
    columns = schema.EPISODE_REFERENCE_INPUT if args.episodes else schema.REFERENCE_INPUT
    while True:
        d = next_rows(ctx, "reference", columns, cfg.batch)
        if d is None:
            continue
        t0 = time.monotonic()
        responses = d.table.column("response_ids").to_pylist()
        starts = d.table.column("segment_starts").to_pylist() if args.episodes else None
        with torch.no_grad(), ctx.timeline.span("score", samples=len(responses)):
            logp = segments.score(lambda p, r: sequence_logprobs(model, p, r, args.temperature, cfg.device),
                                  d.table.column("prompt_ids").to_pylist(), responses, starts).cpu()
        ctx.bus.put({"uid": d.uids, "ref_logprobs": [logp[i, : len(r)].tolist() for i, r in enumerate(responses)]},
                    missing="skip")
        ack_work(ctx, d)
        ctx.report(reports.WORK, samples=len(responses), seconds=time.monotonic() - t0)
