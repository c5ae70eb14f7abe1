"""The launcher: one run, top to bottom — prepare, start the bus and the roles, feed, supervise, shut down.

    rlflow (Hydra) ──► run(cfg)
        prepare   : validate the config, build or locate the model, make the run directory
        start     : bus server process ─ control socket (roles → launcher reports) ─ role processes
                    (actor ×1, rollout ×N, reward ×M, reference ×R when kl_coef > 0)
        feed      : the feeder thread puts prompt groups under admission control (flow/feeder.py)
        supervise : one event queue: reports, metrics, process exits, feeder failure, Ctrl-C
        shut down : stop the feeder, SIGTERM every role, kill what is left after shutdown_seconds,
                    stop the bus, close tracking, remove the socket directory

Invariants: the run ends on the actor's ``done`` (success), on any role's failure or unexpected exit
(a role that returns is a crash), or on Ctrl-C; in every case every process it started is gone when
``run`` returns, and the failing role's traceback is shown. The event queue is unbounded on purpose:
its producers are a handful of processes reporting a few events per step, and losing a report
(a traceback) would be worse than the memory it takes.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import zmq
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel

from flow.config import ConfigError, RunConfig, validate
from flow.feeder import Feeder, prompt_records
from flow.tracking import Tracker, sync_summary
from flow.worker import role_main
from roles import schema
from roles.weights import relay_parent, relays_to_others
from transfer import BusClient, ServerConfig, spawn_server


def run(dcfg: DictConfig, console: Console) -> int:
    """Run one training job; returns the process exit code (0: all steps done)."""
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    check_devices(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    model_path = prepare_model(cfg, console)
    console.print(f"run {run_dir}  model {model_path}  staleness {cfg.flow.staleness}  steps {cfg.flow.steps}")
    with Run(cfg, model_path, console) as r:
        outcome = r.supervise()
    return outcome


def check_devices(cfg: RunConfig) -> None:
    import torch

    for name, device in (("rollout.device", cfg.rollout.device), ("actor.device", cfg.actor.device),
                         ("reference.device", cfg.reference.device)):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{name}={device!r} but torch sees no GPU here; use {name}=cpu")


def prepare_model(cfg: RunConfig, console: Console) -> str:
    if cfg.model.path is not None:
        return cfg.model.path
    import transformers

    from roles.tiny import build_tiny_model

    transformers.logging.disable_progress_bar()

    return build_tiny_model(cfg.model.tiny, cfg.data.task, cfg.data.min_digits, cfg.data.max_digits,
                            cfg.model.cache_dir, log=console.print)


def make_tokenize(model_path: str, chat_template: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template:
        return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=True)
    return lambda text: tokenizer(text)["input_ids"]


def plan_roles(cfg: RunConfig) -> list[tuple[str, int, object, dict, int]]:
    """(role, replica, role config, extra serve() arguments, torch threads) for every process."""
    from roles.tasks import get_task

    reward = dataclasses.replace(cfg.reward, fn=cfg.reward.fn or get_task(cfg.data.task).reward)
    sync = dataclasses.replace(cfg.sync, dtype=cfg.sync.dtype or cfg.rollout.dtype)
    roles = [("actor", 0, cfg.actor, {"steps": cfg.flow.steps, "staleness": cfg.flow.staleness, "sync": sync},
              cfg.actor.threads)]
    roles += [("rollout", i, dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + i), {"sync": sync},
               cfg.rollout.threads) for i in range(cfg.rollout.replicas)]
    roles += [("reward", i, reward, {}, 1) for i in range(cfg.reward.replicas)]
    if cfg.actor.kl_coef > 0:
        roles += [("reference", i, cfg.reference, {"temperature": cfg.rollout.temperature}, cfg.reference.threads)
                  for i in range(cfg.reference.replicas)]
    return roles


class Run:
    """The processes and threads of one run; ``with Run(...)`` guarantees the shutdown path runs."""

    def __init__(self, cfg: RunConfig, model_path: str, console: Console):
        self.cfg, self.model_path, self.console = cfg, model_path, console
        self.events: queue.Queue = queue.Queue()
        self.procs: list[tuple[str, int, mp.process.BaseProcess]] = []
        self.sock_dir = tempfile.mkdtemp(prefix="rlflow-")  # ipc paths must stay short (~100 chars)
        self.server = None
        self.tracker = None
        self.feeder = None
        self.closing = threading.Event()
        self.busy: Counter = Counter()  # seconds each role spent working, from its reports
        self.reward_errors: Counter = Counter()
        self.sync_reports: list[dict] = []  # rollout weight applies since the last step's metrics line
        self.sync_totals: dict[str, dict] = {}  # per rollout replica: bytes from the actor / from peers, applies

    def __enter__(self) -> "Run":
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._shutdown()

    # ------------------------------------------------------------------ start
    def _start(self) -> None:
        cfg, run_dir = self.cfg, self.cfg.run_dir
        self.server = spawn_server(ServerConfig(address=f"ipc://{self.sock_dir}/bus",
                                                capacity_rows=cfg.flow.bus_capacity_rows,
                                                capacity_bytes=cfg.flow.bus_capacity_bytes))
        with BusClient(self.server.address) as bus:
            schema.declare(bus)
        control = f"ipc://{self.sock_dir}/control"
        threading.Thread(target=self._receive, args=(control,), name="rlflow-control", daemon=True).start()
        spec = {"bus": self.server.address, "weights": f"ipc://{self.sock_dir}/weights", "control": control,
                "model_path": self.model_path, "run_dir": run_dir, "seed": cfg.seed,
                "wait_seconds": cfg.flow.wait_seconds, "lease_seconds": cfg.flow.lease_seconds,
                "launcher_pid": os.getpid()}
        ctx = mp.get_context("spawn")  # forking a process that holds a zmq context can hang
        for role, replica, role_cfg, extra, threads in plan_roles(cfg):
            if role == "rollout":
                extra = {**extra, **self._relay_addresses(replica, spec["weights"])}
            p = ctx.Process(target=role_main, args=(role, replica, role_cfg, extra, {**spec, "threads": threads}),
                            name=f"rlflow-{role}-{replica}")
            p.start()
            self.procs.append((role, replica, p))
            threading.Thread(target=self._watch, args=(role, replica, p), daemon=True).start()
        (Path(run_dir) / "processes.json").write_text(json.dumps(
            {"launcher": os.getpid(), "bus": self.server.process.pid,
             "roles": {f"{r}-{i}": p.pid for r, i, p in self.procs}}, indent=1))
        self.tracker = Tracker(cfg.tracking, run_dir, dataclasses.asdict(cfg),
                               cfg.flow.steps, self.console)
        self.feeder = Feeder(self.server.address, spec["weights"], prompt_records(cfg.data),
                             make_tokenize(self.model_path, cfg.data.chat_template),
                             group_size=cfg.rollout.group_size, groups_per_step=cfg.actor.groups_per_step,
                             staleness=cfg.flow.staleness, async_queue_steps=cfg.flow.async_queue_steps,
                             steps=cfg.flow.steps, wait_seconds=cfg.flow.wait_seconds)
        threading.Thread(target=self._feed, name="rlflow-feeder", daemon=True).start()

    def _relay_addresses(self, replica: int, weights: str) -> dict:
        """Where rollout ``replica`` pulls weight chunks from, and where it serves them (chain or tree)."""
        fanout, replicas = self.cfg.sync.fanout, self.cfg.rollout.replicas
        parent = relay_parent(replica, fanout)
        return {"upstream": None if parent is None else f"{weights}-{parent}",
                "relay": f"{weights}-{replica}" if relays_to_others(replica, replicas, fanout) else None}

    def _receive(self, address: str) -> None:
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        try:
            while not self.closing.is_set():
                if sock.poll(200):  # the bound only sets how soon this thread notices shutdown
                    self.events.put(("report", sock.recv_json()))
        finally:
            sock.close(0)

    def _watch(self, role: str, replica: int, p: mp.process.BaseProcess) -> None:
        p.join()
        self.events.put(("exit", {"role": role, "replica": replica, "code": p.exitcode}))

    def _feed(self) -> None:
        try:
            self.feeder.run()
        except BaseException:
            self.events.put(("report", {"role": "feeder", "replica": 0, "kind": "failed",
                                        "traceback": traceback.format_exc()}))

    # ------------------------------------------------------------------ supervise
    def supervise(self) -> int:
        """Handle events until the run is done (0), failed (1) or interrupted (130)."""
        t0 = time.monotonic()
        try:
            while True:
                try:
                    kind, ev = self.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "exit":
                    if self.closing.is_set():
                        continue
                    return self._failed(ev["role"], ev["replica"], None,
                                        f"exited with code {ev['code']} before the run was done")
                verdict = self._report(ev)
                if verdict is not None:
                    return verdict
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping every role[/]")
            return 130
        finally:
            self._summary(time.monotonic() - t0)

    def _report(self, ev: dict) -> int | None:
        kind = ev["kind"]
        if kind == "metrics":
            self.tracker.log({**ev, **sync_summary(self.sync_reports)})
            self.sync_reports.clear()
        elif kind == "sync":
            self.sync_reports.append(ev)
            totals = self.sync_totals.setdefault(f"rollout-{ev['replica']}", {"applied": 0, "refused": 0})
            totals["applied" if ev["bit_exact"] else "refused"] += 1
            totals.update(from_actor_bytes=ev["from_actor_bytes"], from_peers_bytes=ev["from_peers_bytes"],
                          version=ev.get("version", totals.get("version")))
            if "error" in ev:
                self.console.print(f"[yellow]rollout-{ev['replica']} refused {ev['object']}[/]: {ev['error']}; "
                                   f"it resyncs from the keyframe", highlight=False)
        elif kind in ("rollout", "reward", "reference"):
            self.busy[kind] += ev["seconds"]
        elif kind == "reward_error":
            self._reward_error(ev)
        elif kind == "failed":
            return self._failed(ev["role"], ev["replica"], ev.get("traceback"), "failed")
        elif kind == "done":
            self.closing.set()
            self.console.print(f"[green]done[/]: {ev['version']} steps; checkpoint in {self.cfg.run_dir}/checkpoints/final")
            return 0
        return None

    def _reward_error(self, ev: dict) -> None:
        first = self.reward_errors[ev["error"]] == 0
        self.reward_errors[ev["error"]] += 1
        if first:  # each distinct error once, with its row; the count goes to the summary and metrics
            self.console.print(f"[yellow]reward function raised on row {ev['uid']}[/] (prompt {ev['prompt']!r}, "
                               f"response {ev['response']!r}); the sample is skipped:\n{ev['traceback']}")

    def _failed(self, role: str, replica: int, tb: str | None, what: str) -> int:
        self.closing.set()
        body = tb or "(no traceback: the process died without reporting; see its output above)"
        self.console.print(Panel(body, title=f"role {role}-{replica} {what}", border_style="red"))
        return 1

    def _summary(self, wall: float) -> None:
        summary = {"wall_s": round(wall, 3), "model_path": self.model_path, "busy_s": dict(self.busy),
                   "reward_errors": sum(self.reward_errors.values()), "sync": self.sync_totals}
        (Path(self.cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))

    # ------------------------------------------------------------------ shut down
    def _shutdown(self) -> None:
        self.closing.set()
        if self.feeder is not None:
            self.feeder.stop.set()
        for _, _, p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + self.cfg.flow.shutdown_seconds
        for role, replica, p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                self.console.print(f"[yellow]{role}-{replica} did not stop in {self.cfg.flow.shutdown_seconds}s: killed[/]")
                p.kill()
                p.join(5)
        if self.server is not None:
            self.server.stop()
        if self.tracker is not None:
            self.tracker.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
