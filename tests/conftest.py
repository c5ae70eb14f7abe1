"""Shared builders: a bus server in its own process on a unique ipc path, and clients to it."""

from __future__ import annotations

import shutil
import tempfile

import pyarrow as pa
import pytest

from rlflow.engines.base import SamplingParams
from rlflow.transfer import BusClient, ServerConfig, spawn_server

TOKENS = pa.list_(pa.int32())
COLUMNS = {"prompt": TOKENS, "response": TOKENS, "logprobs": pa.list_(pa.float32()),
           "reward": pa.float32(), "version": pa.int64()}


@pytest.fixture
def short_dir():
    # ipc:// paths must stay under ~100 characters, which pytest's tmp_path does not promise
    d = tempfile.mkdtemp(prefix="rlb-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_bus(short_dir: str, **config):
    return spawn_server(ServerConfig(address=f"ipc://{short_dir}/bus.sock", **config))


@pytest.fixture
def bus_server(short_dir):
    server = start_bus(short_dir)
    yield server
    server.stop()


@pytest.fixture
def client(bus_server):
    with BusClient(bus_server.address) as c:
        c.declare(COLUMNS)
        yield c


def new_rows(n: int, group_size: int = 1, prefix: str = "r", version: int | None = None) -> dict:
    rows = {"uid": [f"{prefix}{i}" for i in range(n)],
            "group_id": [f"{prefix}g{i // group_size}" for i in range(n)],
            "prompt": [[i, i + 1] for i in range(n)]}
    if version is not None:
        rows["version"] = [version] * n
    return rows


# ---------------------------------------------------------------------------- the tiny model and runs
@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One cache directory for the session: the tiny model is built once and every run reuses it."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model(model_cache):
    from rlflow.engines.tiny import TinyModelConfig, build_tiny_model, task_demos

    return build_tiny_model(TinyModelConfig(), task_demos("reverse", 3, 5), cache_dir=model_cache, log=lambda *_: None)


G, GROUPS = 4, 6  # reverse_samples: groups of G samples each
SAMPLING = SamplingParams(max_new_tokens=8)  # the rollout's sampling of reverse_samples (what trainers score at)


@pytest.fixture(scope="session")
def _reverse_samples(tiny_model):
    import random
    from rlflow.roles.config import RolloutConfig

    from transformers import AutoTokenizer

    from rlflow.engines.hf import HFRolloutEngine
    from rlflow.tasks.rewards import positional_match
    from rlflow.tasks.builtin import get_task

    tok, rng = AutoTokenizer.from_pretrained(tiny_model), random.Random(1)
    records = [get_task("reverse").make(rng, 3, 5) for _ in range(GROUPS)]
    prompts = [tok(r["prompt"])["input_ids"] for r in records for _ in range(G)]
    engine = HFRolloutEngine(tiny_model, RolloutConfig(device="cpu", dtype="float32", max_batch=64, seed=3))
    gens = engine.generate(prompts, SAMPLING)
    rewards = [positional_match(tok.decode(g.response_ids, skip_special_tokens=True), records[i // G]["answer"])
               for i, g in enumerate(gens)]
    return {"uid": [f"s{i}" for i in range(len(gens))], "group_id": [f"g{i // G}" for i in range(len(gens))],
            "prompt_ids": prompts, "response_ids": [g.response_ids for g in gens],
            "rollout_logprobs": [g.logprobs for g in gens], "version_start": [0] * len(gens),
            "version_end": [0] * len(gens), "reward": rewards}


@pytest.fixture
def reverse_samples(_reverse_samples):
    """GROUPS groups of G samples the tiny model generated for the reverse task (columns as the bus holds
    them), generated once per session; each test gets its own copy."""
    import copy

    return copy.deepcopy(_reverse_samples)
