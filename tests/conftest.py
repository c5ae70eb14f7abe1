"""Shared builders: a bus server in its own process on a unique ipc path, and clients to it."""

from __future__ import annotations

import shutil
import tempfile

import pyarrow as pa
import pytest

from transfer import BusClient, ServerConfig, spawn_server

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
    from roles.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(TinyModelConfig(), "reverse", 3, 5, cache_dir=model_cache, log=lambda *_: None)
