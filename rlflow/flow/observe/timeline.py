"""The run's timeline: what every role replica did when, as ``run_dir/timeline.jsonl`` and a Chrome trace.

    role replica ──(spans, with each heartbeat)──► launcher ─► timeline.jsonl ─► trace.json (rlflow report)
    bus ◄──(stats, every second: BusSampler)──────┘

``timeline.jsonl`` is written while the run goes, one JSON object per line, flushed per line so a run
that fails keeps its timeline. Records (``kind``):
- ``start``   {time}: a launcher started (a resumed run appends a second one);
- ``span``    {role, replica, incarnation, name, t, d, args}: an activity of a replica, t = time.time()
  at its start, d = seconds; names: generate, score, train, all-reduce, sync, checkpoint, wait;
- ``counter`` {name, t, values}: sampled series (the bus's ready and leased rows per consumer);
- ``instant`` {role, replica, name, t, args}: a restart or a rewind.

Clocks: spans carry the wall clock of the host that recorded them. Roles of one machine share it;
under Ray across nodes the trace is only as aligned as the nodes' clocks (NTP: about a millisecond).

``chrome_trace`` turns the records into the Trace Event Format that chrome://tracing and
https://ui.perfetto.dev open: one process per role, one track per replica, the bus and the step
metrics (reward, staleness, ESS, samples/s) as counter tracks. ``utilization`` gives each replica's
seconds per activity over the training window, for the bottleneck plot and the capacity model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

ROLES = ("launcher", "actor", "rollout", "env", "reward", "reference")  # the trace's process order
ACTIVITIES = ("generate", "score", "train", "all-reduce", "sync", "checkpoint", "wait", "episode")  # what spans are named
OWN_TRACK = {"episode": "env"}  # span name -> the role whose track it goes on: a rollout replica's episodes
# overlap each other and its ``generate`` spans, so they are the environment pool's track ``env-<replica>``
STEP_COUNTERS = {"reward": ("reward/mean", "reward/std"), "staleness": ("staleness/mean", "staleness/max"),
                 "ess": ("ess/ratio",), "samples/s": ("samples/s",)}  # counter track -> metrics keys


class TimelineLog:
    """The launcher's writer of ``timeline.jsonl``; threads share it (one lock per line)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "timeline.jsonl"
        self._lock = threading.Lock()
        self._file = open(self.path, "a", buffering=1)
        self.spans_dropped: dict[str, int] = {}  # per replica: spans its bounded buffer dropped
        self._write({"kind": "start", "time": time.time()})

    def heartbeat(self, ev: dict) -> None:
        """The spans a replica's heartbeat carried."""
        who = {"role": ev["role"], "replica": ev["replica"], "incarnation": ev.get("incarnation", 0)}
        for span in ev.get("spans", ()):
            self._write({"kind": "span", **who, "role": OWN_TRACK.get(span.get("name"), ev["role"]), **span})
        if ev.get("spans_dropped"):
            self.spans_dropped[f"{ev['role']}-{ev['replica']}"] = ev["spans_dropped"]

    def counter(self, name: str, values: dict[str, float]) -> None:
        self._write({"kind": "counter", "name": name, "t": round(time.time(), 6), "values": values})

    def instant(self, role: str, replica: int, name: str, ago_s: float = 0.0, **args) -> None:
        """Something that happened to a replica ``ago_s`` seconds ago (a restart: when it began)."""
        self._write({"kind": "instant", "role": role, "replica": replica, "name": name,
                     "t": round(time.time() - ago_s, 6), "args": args})

    def _write(self, record: dict) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class BusSampler:
    """A thread that samples the bus's queues every ``every_s``: rows ready for and leased by each consumer.

    A consumer's ready rows piling up means the role consuming them is the bottleneck; its leased rows are
    its work in flight. It has a bus client of its own (clients are not shared between threads) and stops
    when ``stop`` is set or the bus stops answering (the launcher's supervision handles a dead bus).
    """

    def __init__(self, address: str, keys_dir: str | None, log: TimelineLog, every_s: float = 1.0):
        self.address, self.keys_dir, self.log, self.every_s = address, keys_dir, log, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rlflow-bus-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from rlflow.transfer import BusClient
        from rlflow.transfer import BusError

        try:
            with BusClient(self.address, keys_dir=self.keys_dir) as bus:
                while not self.stop.wait(self.every_s):
                    stats = bus.stats(timeout=10.0)
                    consumers = stats["consumers"]
                    self.log.counter("bus ready rows", {c: s["ready"] for c, s in consumers.items() if s["ready"] is not None})
                    self.log.counter("bus leased rows", {c: s["leased"] for c, s in consumers.items()})
                    self.log.counter("bus rows", {"rows": stats["rows"]})
        except (BusError, OSError):  # the bus went away: the run is ending or supervision reports it
            return

    def close(self, timeout: float = 15.0) -> None:
        self.stop.set()
        self.thread.join(timeout)


# ---------------------------------------------------------------------------------------------- reading
def read_timeline(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "timeline.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file the run appends to (none if it is missing; a torn last line, from a
    killed process, is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def spans_by_replica(records: list[dict]) -> dict[str, list[dict]]:
    """``role-replica`` -> its spans in time order (every incarnation on one track)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "span":
            out.setdefault(f"{r['role']}-{r['replica']}", []).append(r)
    for spans in out.values():
        spans.sort(key=lambda s: s["t"])
    return dict(sorted(out.items(), key=lambda kv: _track_order(kv[0])))


def steady(metrics: list[dict]) -> list[dict]:
    """The steps after the first tenth (start-up, first weights, warm-up), and after at least step 1."""
    return metrics[len(metrics) // 10 + 1:]


def steady_window(records: list[dict], metrics: list[dict]) -> tuple[float, float] | None:
    """The time the steady steps took: from the end of the step before the first of them to the last step's end."""
    ends, kept = step_ends(records), steady(metrics)
    if not kept or kept[0]["step"] - 1 not in ends:
        return None
    return ends[kept[0]["step"] - 1], max(ends.values())


def utilization(records: list[dict], metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Per replica: seconds spent in each activity within the steady window, ``other`` (time in no span:
    bus transfers, decoding, a process not yet started) and ``window`` (its length)."""
    window = steady_window(records, metrics)
    if window is None:
        return {}
    lo, hi = window
    out = {}
    for name, spans in spans_by_replica(records).items():
        seconds: dict[str, float] = {}
        for s in spans:
            overlap = min(hi, s["t"] + s["d"]) - max(lo, s["t"])
            if overlap > 0:
                seconds[s["name"]] = seconds.get(s["name"], 0.0) + overlap
        seconds["other"] = max(0.0, (hi - lo) - sum(seconds.values()))
        seconds["window"] = hi - lo
        out[name] = seconds
    return out


def step_ends(records: list[dict]) -> dict[int, float]:
    """step -> when its optimizer step ended (the trainer's last span for it; after a rewind, the retrained one)."""
    ends: dict[int, float] = {}
    for r in records:
        if r["kind"] == "span" and r["role"] == "actor" and r["replica"] == 0 and r["args"].get("optimizer_step"):
            ends[r["args"]["step"]] = r["t"] + r["d"]
    return ends


# ---------------------------------------------------------------------------------------------- trace
def chrome_trace(records: list[dict], metrics: list[dict], steps: tuple[int, int] | None = None) -> dict:
    """The Trace Event Format (JSON object form) of a run: open it in https://ui.perfetto.dev or chrome://tracing.

    ``steps`` (first, last): only what overlaps those steps (a long run's whole trace can be too big to open).
    """
    if steps is not None:
        records = _between_steps(records, *steps)
        metrics = [m for m in metrics if steps[0] <= m["step"] <= steps[1]]
    starts = [r["time"] for r in records if r["kind"] == "start"]
    t0 = min(starts + [r["t"] for r in records if "t" in r], default=0.0)
    us = lambda t: round((t - t0) * 1e6, 1)  # noqa: E731 - the trace's clock: microseconds since the run started
    pids = {role: i for i, role in enumerate(ROLES)}
    events, tracks = [], {("launcher", 0)}
    for r in records:
        if r["kind"] == "span":
            pid = pids.setdefault(r["role"], len(pids))
            tracks.add((r["role"], r["replica"]))
            events.append({"name": r["name"], "cat": r["role"], "ph": "X", "ts": us(r["t"]),
                           "dur": round(r["d"] * 1e6, 1), "pid": pid, "tid": r["replica"],
                           "args": {**r["args"], "incarnation": r["incarnation"]}})
        elif r["kind"] == "counter":
            events.append({"name": r["name"], "ph": "C", "ts": us(r["t"]), "pid": 0, "args": r["values"]})
        elif r["kind"] == "instant":
            pid = pids.setdefault(r["role"], len(pids))
            tracks.add((r["role"], r["replica"]))
            events.append({"name": r["name"], "ph": "i", "s": "t", "ts": us(r["t"]), "pid": pid,
                           "tid": r["replica"], "args": r["args"]})
    ends = step_ends(records)
    for m in metrics:
        if m["step"] not in ends:
            continue
        for track, keys in STEP_COUNTERS.items():
            values = {k.split("/")[-1]: m[k] for k in keys if isinstance(m.get(k), (int, float)) and m[k] == m[k]}
            if values:
                events.append({"name": track, "ph": "C", "ts": us(ends[m["step"]]), "pid": pids["actor"], "args": values})
    events += _track_names(pids, tracks)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "rlflow", "clock": "seconds since the run started, wall clock of each host"}}


def _between_steps(records: list[dict], first: int, last: int) -> list[dict]:
    """The records overlapping steps first..last: from the end of step first-1 to the end of step last."""
    ends = step_ends(records)
    lo = ends.get(first - 1, float("-inf"))
    hi = ends.get(last, max(ends.values(), default=float("inf")))
    return [r for r in records if r["kind"] == "start"  # the trace's clock stays the run's
            or "t" in r and r["t"] <= hi and r["t"] + r.get("d", 0.0) >= lo]


def _track_names(pids: dict[str, int], tracks: set[tuple[str, int]]) -> list[dict]:
    """Metadata events naming and ordering processes (roles) and threads (replicas)."""
    out = []
    for role, pid in pids.items():
        out.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": role}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
    for role, replica in sorted(tracks, key=lambda t: (pids.get(t[0], 99), t[1])):
        name = "events" if role == "launcher" else f"{role}-{replica}"
        out.append({"name": "thread_name", "ph": "M", "pid": pids[role], "tid": replica, "args": {"name": name}})
    return out


def _track_order(name: str) -> tuple[int, int]:
    role, _, replica = name.rpartition("-")
    return (ROLES.index(role) if role in ROLES else len(ROLES), int(replica))
