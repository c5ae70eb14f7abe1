"""What a role reads off the bus is range-checked before it acts on it (roles/schema.refuse_out_of_range).

With per-role credentials only the feeder and each role write their own columns, so a value out of range
is a bug, or a write the bus should have refused: a role stops on it at once, naming the row, instead of
parking for a policy version no one will publish or indexing past its embedding table.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import start_bus
from rlflow.flow.placement.worker import vocab_size
from rlflow.roles import schema
from rlflow.roles.context import RoleContext, next_rows
from rlflow.transfer import BusClient


def _context(bus, bounds) -> RoleContext:
    return RoleContext(bus=bus, endpoints=None, keys_dir=None, model_path="", report=lambda *a, **k: None,
                       run_dir="", replica=0, seed=0, wait_seconds=5, lease_seconds=30, bounds=bounds)


def _row(uid: str, min_version: int, prompt_ids: list[int]) -> dict:
    return {"uid": [uid], "group_id": [f"{uid}-group"], "prompt_ids": [prompt_ids], "fields": ["{}"],
            "target_step": [0], "min_version": [min_version]}


@pytest.mark.parametrize("uid, min_version, prompt_ids, message", [
    ("parked", 10**6, [1, 2], "min_version = 1000000, outside [-inf, 20]"),  # once parked a rollout for wait_seconds
    ("past-vocab", 0, [1, 256], "prompt_ids = 256, outside [0, 255]"),
])
def test_a_rollout_refuses_a_row_no_feeder_of_the_run_could_have_written(short_dir, uid, min_version, prompt_ids,
                                                                          message):
    server = start_bus(short_dir)
    try:
        with BusClient(server.address) as bus:
            schema.declare(bus)
            ctx = _context(bus, schema.limits(steps=20, vocab=256))
            bus.put(_row("fine", 3, [1, 2]))
            assert next_rows(ctx, "rollout", schema.ROLLOUT_INPUT, 1, groups=True).uids == ["fine"]
            bus.put(_row(uid, min_version, prompt_ids))
            with pytest.raises(schema.RowRefused, match=rf"row '{uid}' holds {re.escape(message)}.*only the feeder may write"):
                next_rows(ctx, "rollout", schema.ROLLOUT_INPUT, 1, groups=True)
    finally:
        server.stop()


def test_the_vocabulary_bound_comes_from_the_checkpoints_config(tmp_path, tiny_model):
    with open(f"{tiny_model}/config.json") as f:
        assert vocab_size(tiny_model) == json.load(f)["vocab_size"] > 0
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 151936}}))
    assert vocab_size(str(tmp_path)) == 151936
    (tmp_path / "config.json").write_text("not json")
    assert vocab_size(str(tmp_path)) is None and schema.limits(5, None).keys() == {
        "min_version", "target_step", "version_start", "version_end", "token_versions", "loss_mask"}
