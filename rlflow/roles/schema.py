"""The sample: one row on the bus. Every column any role reads or writes is declared here, once.

A row is one sample (one response to one prompt); the G samples of a prompt form a group and are
created together by the flow's feeder. Roles add columns to existing rows; the actor consumes whole
groups. ``uid`` and ``group_id`` are the bus's own identity columns (see ``transfer/wire.py``).

| column             | written by | type             | meaning                                                   |
| ------------------ | ---------- | ---------------- | --------------------------------------------------------- |
| prompt_ids         | feeder     | list<int32> [P]  | prompt token ids, special tokens included                 |
| fields             | feeder     | string (JSON)    | the prompt record's other fields (answer, ...) for reward |
| target_step        | feeder     | int64            | optimizer step this group is scheduled for                |
| min_version        | feeder     | int64            | lowest policy version allowed to generate it (staleness)  |
| data_source        | feeder     | string           | the mixture source it was drawn from (data.sources only)  |
| response_ids       | rollout    | list<int32> [T]  | generated token ids, the stop token included              |
| rollout_logprobs   | rollout    | list<float32> [T]| log μ(y_t): the sampling policy's logprob of each token    |
| version_start      | rollout    | int64            | policy version of the oldest sampled token                |
| version_end        | rollout    | int64            | policy version of the newest (> start if weights changed) |
| finish_reason      | rollout    | string           | "stop" (stop token) or "length" (max_new_tokens); episodes: |
|                    |            |                  | "done", "max_turns", "env_error", "env_timeout", "env_died" |
|                    |            |                  | (an agent's also "max_context")                          |
| reward             | reward     | float32          | scalar reward; NaN when the reward function failed        |
| ref_logprobs       | reference  | list<float32> [T]| log π_ref(y_t), only when the recipe has a KL term        |

Episodes (``env.cls`` set: ``roles/episodes.py``) add, all written by the rollout: ``response_ids`` then
holds the whole trajectory after the prompt, model turns and observations interleaved.

| column             | type             | meaning                                                            |
| ------------------ | ---------------- | ------------------------------------------------------------------ |
| loss_mask          | list<int8> [T]   | 1 on tokens the policy sampled, 0 on observations: only 1s train    |
| token_versions     | list<int32> [T]  | policy version of each token (an observation: its turn's)          |
| turn_starts        | list<int32>      | index in response_ids where each model turn starts                 |
| segment_starts     | list<int32>      | where a new context starts (a chat template rewrote history; most  |
|                    |                  | episodes have none): roles/turns.py, algo/segments.py           |
| env_reward         | float32          | the sum of the environment's step rewards (NaN: failed, untrained) |
| env_info           | string (JSON)    | {"counters": the environment's, summed; "env_seconds"; "seconds"}   |
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from rlflow.transfer.access import Grant

TOKENS = pa.list_(pa.int32())
LOGPROBS = pa.list_(pa.float32())

COLUMNS: dict[str, pa.DataType] = {
    "prompt_ids": TOKENS,
    "fields": pa.string(),
    "target_step": pa.int64(),
    "min_version": pa.int64(),
    "data_source": pa.string(),
    "response_ids": TOKENS,
    "rollout_logprobs": LOGPROBS,
    "version_start": pa.int64(),
    "version_end": pa.int64(),
    "finish_reason": pa.string(),
    "reward": pa.float32(),
    "ref_logprobs": LOGPROBS,
    "loss_mask": pa.list_(pa.int8()),
    "token_versions": pa.list_(pa.int32()),
    "turn_starts": pa.list_(pa.int32()),
    "segment_starts": pa.list_(pa.int32()),
    "env_reward": pa.float32(),
    "env_info": pa.string(),
}

# What each role reads. The actor's list grows by ref_logprobs when a KL term is on.
ROLLOUT_INPUT = ["prompt_ids", "min_version"]
REWARD_INPUT = ["response_ids", "fields"]
REFERENCE_INPUT = ["prompt_ids", "response_ids"]
ACTOR_INPUT = ["prompt_ids", "response_ids", "rollout_logprobs", "version_start", "version_end", "reward"]
# With an environment: the rollout also reads the record (for the environment's reset), the reward role
# the last turn and the environment's reward, the actor the mask and what its metrics count.
EPISODE_ROLLOUT_INPUT = ROLLOUT_INPUT + ["fields"]
EPISODE_REWARD_INPUT = REWARD_INPUT + ["turn_starts", "env_reward", "finish_reason"]
EPISODE_ACTOR_INPUT = ACTOR_INPUT + ["loss_mask", "turn_starts", "segment_starts", "finish_reason", "env_info",
                                     "token_versions"]
EPISODE_REFERENCE_INPUT = REFERENCE_INPUT + ["segment_starts"]
EPISODE_COLUMNS = ["loss_mask", "token_versions", "turn_starts", "segment_starts", "env_reward", "env_info"]
SOURCE_KEY = "data_source"  # a mixture record's field naming its source (data.sources), and the column of it
ENV_FAILURES = ("env_error", "env_timeout", "env_died")  # an episode's finish_reason when its environment failed

# Rows leave the bus when the actor has acked them: the actor is the one consumer every sample reaches.
RELEASE_AFTER = ["actor"]

WRITES = {  # who writes which columns (the table above)
    "feeder": ["prompt_ids", "fields", "target_step", "min_version", "data_source"],
    "rollout": ["response_ids", "rollout_logprobs", "version_start", "version_end", "finish_reason",
                *EPISODE_COLUMNS],
    "reward": ["reward"],
    "reference": ["ref_logprobs"],
}


CHANNEL_ROLES = ("actor", "rollout")  # hold the weight channel's key: the actor publishes and signs, rollouts
# read and relay (the launcher's feeder reads versions with it too); reward and reference never see weights


def grants() -> dict[str, Grant]:
    """What each part of a run may do on its bus (``transfer/access.py``): a role gets and acks only as
    itself, reads only its input columns and writes only its own; only the feeder creates rows; only
    the launcher declares, clears and hands back a dead replica's rows. A peer holding no token can
    only say hello and read stats."""
    def role(name: str, reads: list[str]) -> Grant:
        return Grant(name, consumers=(name,), read=tuple(reads), write=tuple(WRITES.get(name, ())))

    return {"launcher": Grant("launcher", admin=True),
            "feeder": Grant("feeder", write=tuple(WRITES["feeder"]), create=True),
            "rollout": role("rollout", EPISODE_ROLLOUT_INPUT), "reward": role("reward", EPISODE_REWARD_INPUT),
            "reference": role("reference", EPISODE_REFERENCE_INPUT),
            "actor": role("actor", EPISODE_ACTOR_INPUT + ["ref_logprobs", "target_step", "data_source"])}


def declare(bus) -> None:
    """Declare the sample columns on a bus (idempotent for the same types)."""
    bus.declare(COLUMNS, release_after=RELEASE_AFTER)


class RowRefused(ValueError):
    """A delivered row holds a value no part of this run could have written (only the feeder and the roles
    may write, each its own columns): the role stops on it, naming the row, instead of acting on it."""


def limits(steps: int, vocab: int | None) -> dict[str, tuple[int | None, int | None]]:
    """The range of each integer column in a run of ``steps`` optimizer steps and a model of ``vocab``
    token ids (None: unknown). ``min_version`` has no lower bound (s - k is below 0 early on)."""
    out = {"min_version": (None, steps), "target_step": (0, steps - 1), "version_start": (0, steps),
           "version_end": (0, steps), "token_versions": (0, steps), "loss_mask": (0, 1)}
    if vocab:
        out.update(prompt_ids=(0, vocab - 1), response_ids=(0, vocab - 1))
    return out


def refuse_out_of_range(delivery, bounds: dict[str, tuple[int | None, int | None]]) -> None:
    """Raise RowRefused if a column of ``delivery`` holds a value outside ``bounds``, naming the first such
    row (checked per column with Arrow kernels: a few array passes, never a Python loop over rows)."""
    table = delivery.table
    for column, (lo, hi) in bounds.items():
        if column not in table.column_names or not len(table):
            continue
        values = table.column(column).combine_chunks()
        flat = pc.list_flatten(values) if pa.types.is_list(values.type) else values
        low, high = pc.min_max(flat).values()
        low, high = low.as_py(), high.as_py()
        if low is None or ((lo is None or low >= lo) and (hi is None or high <= hi)):
            continue
        out = pc.invert(pc.and_(pc.greater_equal(flat, lo if lo is not None else low),
                                pc.less_equal(flat, hi if hi is not None else high)))
        at = pc.index(out, True).as_py()
        row = pc.list_parent_indices(values)[at].as_py() if flat is not values else at
        writer = next((who for who, cols in WRITES.items() if column in cols), "?")
        raise RowRefused(f"row {table.column('uid')[row].as_py()!r} holds {column} = {flat[at].as_py()}, outside "
                         f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], which this "
                         f"run's {writer} never writes: refused (a bug, or a write the bus should have refused: "
                         f"only the {writer} may write {column})")
