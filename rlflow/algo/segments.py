"""Scoring a response made of segments: each segment against its own context (``roles/turns.py``).

A multi-turn episode whose chat template rewrote history continues in a new segment: at index ``s`` of
``response_ids`` the whole re-rendered conversation starts (context, loss mask 0), and the turns after
it were generated from that context alone. So the logprob of a token in segment k is taken given the
tokens of segment k before it, never given earlier segments:

    segment 0:  context = prompt,            tokens = response[0 : s_1]
    segment k:  context = response[s_k],     tokens = response[s_k + 1 : s_{k+1}]

(the first token of a segment is context, masked out, so it needs no logprob). ``score`` works with any
scorer of (prompts, responses) -> [B, T] logprobs (a TrainEngine's ``token_logprobs``, the reference's
``sequence_logprobs``), in one batched call over every segment, and puts each segment's logprobs back
at its place in its row: a row without segments is scored exactly as before.
"""

from __future__ import annotations

from typing import Callable


def split(prompt: list[int], response: list[int], starts: list[int]) -> list[tuple[list[int], list[int], int]]:
    """``(context, tokens, offset in response)`` of each segment of one row (empty segments left out)."""
    bounds = [0, *starts, len(response)]
    out = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        context, first = (prompt, lo) if k == 0 else (response[lo: lo + 1], lo + 1)
        if hi > first:
            out.append((context, response[first:hi], first))
    return out


def score(fn: Callable, prompts: list[list[int]], responses: list[list[int]], starts: list[list[int]] | None):
    """[B, T] logprobs of every response token, each segment scored against its own context."""
    if not starts or not any(starts):
        return fn(prompts, responses)
    pieces = [(b, *piece) for b, (p, r, s) in enumerate(zip(prompts, responses, starts)) for piece in split(p, r, s)]
    scored = fn([c for _, c, _, _ in pieces], [t for _, _, t, _ in pieces])  # [N, T']
    out = scored.new_zeros(len(responses), max(len(r) for r in responses))
    for n, (b, _, tokens, offset) in enumerate(pieces):
        out[b, offset: offset + len(tokens)] = scored[n, : len(tokens)]
    return out
