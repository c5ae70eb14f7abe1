"""Throughput of moving Arrow record batches from one process to another.

Every case moves the same seeded batches of RL samples (columns `uid`, `group_id`, `ids`
list<int32>, `logprobs` list<float32>) from a producer process to a consumer process:

    raw_zmq     ZeroMQ PUSH -> PULL over ipc://, Arrow IPC bytes serialized before timing,
                zero-copy send and zero-copy decode: the practical limit of one hop.
    pickle_zmq  the same socket pair, but each batch travels as pickled Python lists / numpy
                arrays and is rebuilt into Arrow on arrival (the common hand-rolled approach).
    ray         ray.put in a producer actor, the ObjectRef handed to a consumer actor that
                ray.get()s it (how Ray-based RL frameworks move batches between workers).
    bus         the project's transfer bus over ipc://: put -> get(n rows) -> ack.
                On one host the client proves it shares /dev/shm with the server, so payloads
                travel as shared-memory files and only their names cross the socket.
    bus_socket  the bus over ipc:// with shared memory off: every payload byte crosses the
                socket twice (producer -> server -> consumer), as between machines.
    bus_tcp     bus_socket over tcp://127.0.0.1, the transport used across machines.

Every bus case runs as a run's bus does: with a credential per client (``transfer/access.py``), so
each request is checked against what the producer's and the consumer's tokens grant.

Two shapes: `large` (256 rows x 1024..4096 tokens, ~5 MiB per batch) and `small` (4096 rows x
16 tokens). Throughput = sum(batch.nbytes) / wall time, GB = 1e9 bytes.

Run from the repository root:

    python -m benchmarks.bus            # full run, about a minute on 2 cores
    python -m benchmarks.bus --quick    # ~1/5 of the batches, under a minute

Progress goes to stderr; the last line of stdout is one JSON object with every figure and the
ratios of the bus against each baseline that succeeded in the same run.

Simplifications:
- One timed run per case after one untimed warm-up batch; no repeats, no median.
- The clock starts in the producer just before its first timed send and stops in the consumer
  after it decoded and row-checked the last batch; both read time.time(), which is the same
  clock for processes on one machine.
- Batches are built (and, for raw_zmq / pickle_zmq, converted to their wire or Python form)
  before the clock starts: we time the transfer, not the data generation.
- pickle_zmq sends fewer batches (it is ~100x slower on the small shape); each case reports
  its own batch count and bytes, and ratios compare throughputs, not totals.
- Token columns cycle through a pool of a few distinct payloads; only uid / group_id differ.
- Ray's cluster start-up is excluded from the ray figure and reported as `ray_startup_s`.
- A case that fails records {"error": ...} and the run continues; ray is skipped if absent.
"""

import argparse
import json
import multiprocessing as mp
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zmq

SEED = 1234
CONSUMER = "bench"  # consumer name on the bus; rows are released once it acked them
PAYLOAD_COLUMNS = {"ids": pa.list_(pa.int32()), "logprobs": pa.list_(pa.float32())}
SCHEMA = pa.schema([("uid", pa.string()), ("group_id", pa.string()), *PAYLOAD_COLUMNS.items()])
CHILD_TIMEOUT_S = 60.0  # any single wait inside a producer / consumer
CASE_TIMEOUT_S = 240.0  # a whole case, including child start-up and batch building
VOCAB = 151_936
TOKEN_POOL_SIZE = 8  # distinct token payloads cycled through the batches of a run
RAY_MAX_IN_FLIGHT = 16  # batches put, not yet taken: bounds the object store like the bus capacity


@dataclass(frozen=True)
class Shape:
    name: str
    num_rows: int  # rows per batch
    min_len: int  # tokens per row, uniform in [min_len, max_len]
    max_len: int
    group_size: int
    num_batches: int  # timed batches in a full run
    num_pickle_batches: int  # fewer for pickle_zmq, up to ~100x slower, to keep the run short


SHAPES = [
    Shape("large", num_rows=256, min_len=1024, max_len=4096, group_size=8,  # ~5 MiB per batch
          num_batches=150, num_pickle_batches=60),
    Shape("small", num_rows=4096, min_len=16, max_len=16, group_size=8,  # ~0.7 MiB per batch
          num_batches=600, num_pickle_batches=60),
]


def log(msg: str) -> None:
    print(f"[bench.bus] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Data


def make_batches(shape: Shape, num_batches: int) -> list[pa.RecordBatch]:
    """num_batches + 1 seeded batches; the first one is the untimed warm-up.

    Token columns cycle through a small pool of distinct payloads (Arrow arrays are immutable,
    so batches share them) to keep generation time and producer memory low; uid and group_id
    are unique per batch because the bus keys rows by uid.
    """
    rng = np.random.default_rng(SEED)
    pool = [_make_tokens(shape, rng) for _ in range(TOKEN_POOL_SIZE)]
    return [_make_batch(shape, b, *pool[b % TOKEN_POOL_SIZE]) for b in range(num_batches + 1)]


def _make_tokens(shape: Shape, rng: np.random.Generator) -> tuple[pa.ListArray, pa.ListArray]:
    lengths = rng.integers(shape.min_len, shape.max_len + 1, size=shape.num_rows)  # (R,)
    offsets = np.zeros(shape.num_rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    num_tokens = int(offsets[-1])
    ids = rng.integers(0, VOCAB, size=num_tokens, dtype=np.int32)  # (sum T,)
    logprobs = -10.0 * rng.random(num_tokens, dtype=np.float32)  # (sum T,)
    offsets = pa.array(offsets)
    return (
        pa.ListArray.from_arrays(offsets, pa.array(ids)),
        pa.ListArray.from_arrays(offsets, pa.array(logprobs)),
    )


def _make_batch(shape: Shape, index: int, ids: pa.Array, logprobs: pa.Array) -> pa.RecordBatch:
    uids = [f"{shape.name}-{index}-{i}" for i in range(shape.num_rows)]
    groups = [f"{shape.name}-{index}-g{i // shape.group_size}" for i in range(shape.num_rows)]
    columns = [pa.array(uids, pa.string()), pa.array(groups, pa.string()), ids, logprobs]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def check_rows(num_rows: int, expected: int, what: str) -> None:
    if num_rows != expected:
        raise RuntimeError(f"{what}: got {num_rows} rows, expected {expected}")


def producer_summary(batches: list[pa.RecordBatch], t0: float) -> dict:
    timed = batches[1:]
    return {
        "t0": t0,
        "bytes": sum(b.nbytes for b in timed),
        "rows": sum(b.num_rows for b in timed),
        "batches": len(timed),
    }


# ----------------------------------------------------------------------------
# Process harness: a producer and a consumer child, a result queue, two events.
# warm: the consumer has the warm-up batch, so the producer may start the clock.
# done: the consumer has everything, so the producer may close its socket (LINGER=0 would
#       otherwise drop queued messages).


def _child_main(role: str, fn, args: tuple, results) -> None:
    try:
        results.put({"role": role, **fn(*args)})
    except BaseException:  # a child's failure must reach the parent, whatever it is
        results.put({"role": role, "error": traceback.format_exc()})


def run_pair(case: str, producer: tuple, consumer: tuple) -> dict:
    """Run producer(warm, done, *args) and consumer(warm, done, *args) in spawned processes."""
    ctx = mp.get_context("spawn")
    results, warm, done = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = {
        role: ctx.Process(target=_child_main, args=(role, fn, (warm, done, *args), results))
        for role, (fn, *args) in (("producer", producer), ("consumer", consumer))
    }
    for p in procs.values():
        p.start()
    grace_s = 1.0  # after a failure the surviving peer is usually blocked on it: kill it soon
    try:
        got = _collect(case, procs, results)
        grace_s = 10.0
        return got
    finally:
        _reap(case, procs, grace_s)


def _collect(case: str, procs: dict, results) -> dict:
    got: dict[str, dict] = {}
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while len(got) < len(procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{case}: no result from {sorted(set(procs) - set(got))} in time")
        try:
            msg = results.get(timeout=0.5)
        except queue.Empty:
            _raise_if_dead(case, procs, got, results)
            continue
        if "error" in msg:
            raise RuntimeError(f"{case}: {msg['role']} process failed:\n{msg['error']}")
        got[msg["role"]] = msg
    return got


def _raise_if_dead(case: str, procs: dict, got: dict, results) -> None:
    for role, p in procs.items():
        if role in got or p.is_alive():
            continue
        try:  # its last message may still be in the pipe
            msg = results.get(timeout=2.0)
        except queue.Empty:
            raise RuntimeError(f"{case}: {role} process exited ({p.exitcode}) without a result")
        results.put(msg)  # hand it back to _collect, which knows how to read it
        return


def _reap(case: str, procs: dict, grace_s: float) -> None:
    for role, p in procs.items():
        p.join(timeout=grace_s)
        if p.is_alive():
            log(f"{case}: {role} process did not exit, killing it")
            p.kill()
            p.join(timeout=5.0)


def throughput(producer: dict, t1: float) -> dict:
    seconds = t1 - producer["t0"]
    return {
        "seconds": round(seconds, 4),
        "rows_per_s": round(producer["rows"] / seconds, 1),
        "gb_per_s": round(producer["bytes"] / seconds / 1e9, 4),
        "batches": producer["batches"],
        "bytes": producer["bytes"],
    }


def _wait(event, what: str) -> None:
    if not event.wait(CHILD_TIMEOUT_S):
        raise TimeoutError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------
# ZeroMQ sockets shared by raw_zmq and pickle_zmq


def _zmq_socket(kind: int, address: str, bind: bool) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(CHILD_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.RCVTIMEO, int(CHILD_TIMEOUT_S * 1000))
    (sock.bind if bind else sock.connect)(address)
    return ctx, sock


def _zmq_close(ctx: zmq.Context, sock: zmq.Socket) -> None:
    sock.close(linger=0)
    ctx.term()


def _zmq_produce(warm, done, address: str, items: list, encode, batches: list) -> dict:
    """Send encode(item) per item; encode runs inside the timed loop."""
    ctx, sock = _zmq_socket(zmq.PUSH, address, bind=True)
    try:
        sock.send(encode(items[0]), copy=False)
        _wait(warm, "the consumer to receive the warm-up batch")
        t0 = time.time()
        for item in items[1:]:
            sock.send(encode(item), copy=False)
        _wait(done, "the consumer to receive every batch")
        return producer_summary(batches, t0)
    finally:
        _zmq_close(ctx, sock)


def _zmq_consume(warm, done, address: str, decode, num_batches: int, num_rows: int) -> dict:
    ctx, sock = _zmq_socket(zmq.PULL, address, bind=False)
    try:
        check_rows(decode(sock.recv(copy=False)).num_rows, num_rows, "warm-up batch")
        warm.set()
        for i in range(num_batches):
            check_rows(decode(sock.recv(copy=False)).num_rows, num_rows, f"batch {i}")
        t1 = time.time()
        done.set()
        return {"t1": t1}
    finally:
        _zmq_close(ctx, sock)


# ----------------------------------------------------------------------------
# Case raw_zmq: pre-serialized Arrow IPC stream, zero-copy on both ends


def _to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _identity(buf: pa.Buffer) -> pa.Buffer:
    return buf


def _from_ipc(frame: zmq.Frame) -> pa.RecordBatch:
    return pa.ipc.open_stream(pa.py_buffer(frame.buffer)).read_next_batch()


def raw_zmq_producer(warm, done, address: str, shape: Shape, num_batches: int) -> dict:
    batches = make_batches(shape, num_batches)
    return _zmq_produce(warm, done, address, [_to_ipc(b) for b in batches], _identity, batches)


def raw_zmq_consumer(warm, done, address: str, shape: Shape, num_batches: int) -> dict:
    return _zmq_consume(warm, done, address, _from_ipc, num_batches, shape.num_rows)


# ----------------------------------------------------------------------------
# Case pickle_zmq: the pickle-the-Python-objects approach.
# The producer holds each batch the way such frameworks do -- string columns as lists, token
# columns as one numpy array per row -- built before the clock (a pickle-based producer already
# has its data in this form). Timed: pickle.dumps(protocol=5) per batch, send, recv,
# pickle.loads, and rebuilding an Arrow RecordBatch. The rebuild concatenates the per-row
# arrays and uses ListArray.from_arrays, the fastest fair way, rather than pa.array over a list.


def _to_python(batch: pa.RecordBatch) -> dict:
    out = {col: batch.column(col).to_pylist() for col in ("uid", "group_id")}
    for col in PAYLOAD_COLUMNS:
        lists = batch.column(col)
        values = lists.values.to_numpy()
        out[col] = np.split(values, lists.offsets.to_numpy()[1:-1])  # R arrays of (T_r,)
    return out


def _from_pickle(frame: zmq.Frame) -> pa.RecordBatch:
    payload = pickle.loads(frame.buffer)
    lengths = np.fromiter((len(a) for a in payload["ids"]), dtype=np.int32)  # (R,)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    offsets = pa.array(offsets)
    columns = [pa.array(payload["uid"], pa.string()), pa.array(payload["group_id"], pa.string())]
    for col in PAYLOAD_COLUMNS:
        columns.append(pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(payload[col]))))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=5)


def pickle_zmq_producer(warm, done, address: str, shape: Shape, num_batches: int) -> dict:
    batches = make_batches(shape, num_batches)
    objects = [_to_python(b) for b in batches]
    return _zmq_produce(warm, done, address, objects, _pickle, batches)


def pickle_zmq_consumer(warm, done, address: str, shape: Shape, num_batches: int) -> dict:
    return _zmq_consume(warm, done, address, _from_pickle, num_batches, shape.num_rows)


# ----------------------------------------------------------------------------
# Case ray: ray.put in a producer actor, the ref handed to a consumer actor, ray.get there.
# The ref travels inside a list: a top-level ObjectRef argument would be resolved by Ray
# before the method runs, hiding the ray.get we want inside the consumer.


class RayProducer:
    def __init__(self, shape: Shape, num_batches: int):
        self.batches = make_batches(shape, num_batches)

    def ready(self) -> bool:
        return True

    def run(self, consumer) -> dict:
        import ray

        ray.get(consumer.take.remote([ray.put(self.batches[0])]), timeout=CHILD_TIMEOUT_S)
        t0 = time.time()
        pending = []
        for i, batch in enumerate(self.batches[1:]):
            if i >= RAY_MAX_IN_FLIGHT:
                ray.get(pending[i - RAY_MAX_IN_FLIGHT], timeout=CHILD_TIMEOUT_S)
            pending.append(consumer.take.remote([ray.put(batch)]))
        # Calls from one caller run in order on the consumer, so the last stamp is the end.
        stamps = ray.get(pending, timeout=CASE_TIMEOUT_S)
        return {**producer_summary(self.batches, t0), "t1": stamps[-1]}


class RayConsumer:
    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.num_taken = 0

    def ready(self) -> bool:
        return True

    def take(self, refs: list) -> float:
        import ray

        batch = ray.get(refs[0], timeout=CHILD_TIMEOUT_S)
        check_rows(batch.num_rows, self.num_rows, f"batch {self.num_taken}")
        self.num_taken += 1
        return time.time()


class Skipped(Exception):
    """A case that cannot run here (an optional dependency is missing)."""


class RaySession:
    """A private local Ray cluster, started on first use so it does not compete for the two
    cores while the other cases run."""

    def __init__(self):
        self.ray = None  # the module, once imported
        self.startup_s: float | None = None

    def ensure_started(self) -> None:
        try:
            import ray
        except ImportError:
            raise Skipped("ray not installed")
        self.ray = ray
        if ray.is_initialized():
            return
        start = time.perf_counter()
        # address="local" always starts a fresh cluster; a bare ray.init() could attach to
        # someone else's running cluster.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
        self.startup_s = round(time.perf_counter() - start, 3)
        log(f"ray: local cluster up in {self.startup_s:.1f}s")

    def shutdown(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()


def run_ray(session: RaySession, shape: Shape, num_batches: int) -> dict:
    session.ensure_started()
    import ray

    # num_cpus=0: both actors must be placed at once on a 2-CPU cluster, whatever is left over
    producer = ray.remote(num_cpus=0)(RayProducer).remote(shape, num_batches)
    consumer = ray.remote(num_cpus=0)(RayConsumer).remote(shape.num_rows)
    try:
        ray.get([producer.ready.remote(), consumer.ready.remote()], timeout=CASE_TIMEOUT_S)
        out = ray.get(producer.run.remote(consumer), timeout=CASE_TIMEOUT_S)
    finally:
        ray.kill(producer)
        ray.kill(consumer)
    return throughput(out, out["t1"])


# ----------------------------------------------------------------------------
# Cases bus / bus_tcp: the project's transfer bus


PRODUCER_TOKEN, CONSUMER_TOKEN, ADMIN_TOKEN = "p" * 32, "c" * 32, "a" * 32  # a benchmark's own bus


def bus_grants() -> dict:
    from rlflow.transfer import Grant

    return {PRODUCER_TOKEN: Grant("producer", write=tuple(PAYLOAD_COLUMNS), create=True),
            CONSUMER_TOKEN: Grant("consumer", consumers=(CONSUMER,), read=tuple(PAYLOAD_COLUMNS)),
            ADMIN_TOKEN: Grant("admin", admin=True)}


def bus_producer(warm, done, address: str, shape: Shape, num_batches: int, shared_memory: bool) -> dict:
    from rlflow.transfer import BusClient

    batches = make_batches(shape, num_batches)
    client = BusClient(address, shared_memory=shared_memory, token=PRODUCER_TOKEN)
    try:
        client.put(batches[0], timeout=CHILD_TIMEOUT_S)
        _wait(warm, "the consumer to get the warm-up batch")
        t0 = time.time()
        for batch in batches[1:]:
            # One put in flight: the next batch is written while the server stores this one.
            client.put(batch, timeout=CHILD_TIMEOUT_S, wait=False)
        client.flush()
        _wait(done, "the consumer to get every batch")
        return producer_summary(batches, t0)
    finally:
        client.close()


def bus_consumer(warm, done, address: str, shape: Shape, num_batches: int, shared_memory: bool) -> dict:
    from rlflow.transfer import BusClient

    client = BusClient(address, shared_memory=shared_memory, token=CONSUMER_TOKEN)
    try:
        previous = _bus_take(client, shape.num_rows, "warm-up batch", None)
        warm.set()
        for i in range(num_batches):
            previous = _bus_take(client, shape.num_rows, f"batch {i}", previous)
        client.ack(previous)
        t1 = time.time()
        done.set()
        return {"t1": t1}
    finally:
        client.close()


def _bus_take(client, num_rows: int, what: str, previous):
    # The previous delivery's ack rides on this get: one round trip per batch, as a trainer loop does.
    columns = list(PAYLOAD_COLUMNS)
    sample = client.get(CONSUMER, columns=columns, n=num_rows, timeout=CHILD_TIMEOUT_S, ack=previous)
    check_rows(len(sample.table), num_rows, what)
    return sample


def run_bus(case: str, address: str, shape: Shape, num_batches: int, shared_memory: bool) -> dict:
    from rlflow.transfer import BusClient, ServerConfig, spawn_server

    config = ServerConfig(address=address, capacity_bytes=2 * 1024**3, capacity_rows=1 << 20, grants=bus_grants())
    server = spawn_server(config)
    try:
        # Declared here, before either child starts, so the consumer's first get never races it.
        admin = BusClient(server.address, token=ADMIN_TOKEN)
        try:
            admin.declare(PAYLOAD_COLUMNS, release_after=[CONSUMER])
        finally:
            admin.close()
        args = (server.address, shape, num_batches, shared_memory)
        got = run_pair(case, (bus_producer, *args), (bus_consumer, *args))
    finally:
        server.stop()
    return throughput(got["producer"], got["consumer"]["t1"])


def _free_port() -> int:
    # Racy by nature (another process may take the port before the server binds), fine here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------
# Driver

CASES = ("raw_zmq", "pickle_zmq", "bus", "bus_socket", "bus_tcp", "ray")  # ray last: its daemons stay up
RATIOS = (("bus", "raw_zmq"), ("bus", "ray"), ("bus", "pickle_zmq"), ("bus_socket", "raw_zmq"),
          ("bus_socket", "ray"), ("bus_tcp", "raw_zmq"))


def run_case(case: str, shape: Shape, num_batches: int, tmpdir: str, ray_session) -> dict:
    name = f"{case}-{shape.name}"
    if case in ("raw_zmq", "pickle_zmq"):
        producer, consumer = {
            "raw_zmq": (raw_zmq_producer, raw_zmq_consumer),
            "pickle_zmq": (pickle_zmq_producer, pickle_zmq_consumer),
        }[case]
        args = (f"ipc://{tmpdir}/{name}.sock", shape, num_batches)
        got = run_pair(name, (producer, *args), (consumer, *args))
        return throughput(got["producer"], got["consumer"]["t1"])
    if case == "bus":
        return run_bus(name, f"ipc://{tmpdir}/{name}.sock", shape, num_batches, shared_memory=True)
    if case == "bus_socket":
        return run_bus(name, f"ipc://{tmpdir}/{name}.sock", shape, num_batches, shared_memory=False)
    if case == "bus_tcp":
        return run_bus(name, f"tcp://127.0.0.1:{_free_port()}", shape, num_batches, shared_memory=False)
    if case == "ray":
        return run_ray(ray_session, shape, num_batches)
    raise AssertionError(f"unknown case {case!r}")


def measure(case: str, shape: Shape, num_batches: int, tmpdir: str, ray_session) -> dict:
    """One case, with failures turned into a JSON entry so the run always reports."""
    label = f"{shape.name}/{case}"
    log(f"{label}: {num_batches} batches ...")
    try:
        result = run_case(case, shape, num_batches, tmpdir, ray_session)
    except Skipped as e:
        log(f"{label}: skipped ({e})")
        return {"skipped": str(e)}
    except Exception as e:  # per-case fault boundary: record it, keep measuring the rest
        log(f"{label}: FAILED\n{traceback.format_exc()}")
        return {"error": _one_line(e)}
    log(
        f"{label}: {result['seconds']:.3f}s  {result['rows_per_s']:,.0f} rows/s"
        f"  {result['gb_per_s']:.3f} GB/s"
    )
    return result


def _one_line(e: Exception) -> str:
    """First and last line: for a child's failure, which process failed and with what."""
    lines = str(e).strip().splitlines() or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return f"{type(e).__name__}: {text}"


def ratios(cases: dict) -> dict:
    out = {}
    for num, den in RATIOS:
        a, b = cases.get(num, {}), cases.get(den, {})
        if "gb_per_s" in a and "gb_per_s" in b:
            out[f"{num}_vs_{den}"] = round(a["gb_per_s"] / b["gb_per_s"], 3)
    return out


def num_batches_for(case: str, shape: Shape, quick: bool) -> int:
    full = shape.num_pickle_batches if case == "pickle_zmq" else shape.num_batches
    return max(2, full // 5) if quick else full


def shape_report(shape: Shape, cases: dict, quick: bool) -> dict:
    num_batches = num_batches_for("raw_zmq", shape, quick)
    sizes = [c["bytes"] for c in cases.values() if c.get("batches") == num_batches]
    return {
        "rows_per_batch": shape.num_rows,
        "batches": num_batches,  # per case "batches" says where a case sent fewer
        "bytes": sizes[0] if sizes else None,
        "cases": cases,
        "ratios": ratios(cases),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1/5 of the batches")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    results: dict[str, dict] = {s.name: {} for s in SHAPES}
    tmpdir = tempfile.mkdtemp(prefix="rlflow-bench-bus-")
    ray_session = RaySession()
    try:
        for case in cases:
            for shape in SHAPES:
                num_batches = num_batches_for(case, shape, args.quick)
                results[shape.name][case] = measure(case, shape, num_batches, tmpdir, ray_session)
    finally:
        ray_session.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)
    shapes = {s.name: shape_report(s, results[s.name], args.quick) for s in SHAPES}
    out = {"benchmark": "bus", "quick": args.quick, "ray_startup_s": ray_session.startup_s}
    print(json.dumps({**out, "shapes": shapes}), flush=True)


if __name__ == "__main__":
    main()
