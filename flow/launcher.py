"""The launcher: one run, top to bottom — prepare, start the bus and the roles, feed, supervise, shut down.

    rlflow (Hydra) ──► run(cfg)
        prepare   : validate the config, build or locate the model, make the run directory
        start     : bus server ─ control socket (roles → launcher reports) ─ role replicas
                    (actor ×1, rollout ×N, reward ×M, reference ×R when kl_coef > 0), placed by
                    flow/local.py (processes of this machine) or flow/ray_cluster.py (launcher=ray)
        feed      : the feeder thread puts prompt groups under admission control (flow/feeder.py)
        supervise : one event queue: reports, heartbeats (carrying the roles' timeline spans: written to
                    timeline.jsonl, flow/timeline.py), metrics, process exits, feeder failure, Ctrl-C;
                    a replica that dies, fails or hangs is restarted by policy (flow/supervisor.py)
        shut down : stop the feeder, stop every role (kill what is left after shutdown_seconds), take
                    their last spans, stop the bus, write the report and print the capacity advice
                    (flow/report.py), close tracking, remove the socket directory

Invariants: the run ends on the actor's ``done`` (success), on a failure supervision may not recover
(the bus, a replica past its restart budget, a start-up error), or on Ctrl-C; in every case every
process it started is gone when ``run`` returns, and the failing role's traceback is shown. A restarted
replica loses nothing: it is killed for sure before its leases are handed back to the bus, so no row
is held by two live incarnations, and every row it held is redelivered. The event queue is unbounded on purpose:
its producers are a handful of processes reporting a few events per step, and losing a report
(a traceback) would be worse than the memory it takes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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

from flow.capacity import machine_cores
from flow.config import ConfigError, RunConfig, StartError, validate
from flow.feeder import Feeder, logical_uid, prompt_records, uid
from flow.resume import ResumePoint, newest_point, requested_point
from flow.supervisor import Supervisor
from flow.timeline import BusSampler, TimelineLog
from flow.tracking import Tracker, sync_summary
from flow.worker import holder_name
from roles import schema
from roles.weights import relay_parent, relays_to_others
from transfer import BusClient, ServerConfig, security

KILL_WAIT_S = 30.0  # bound on a killed replica's process (or Ray actor) being reported gone
FEEDER_STOP_S = 30.0  # bound on the feeder thread returning once asked to (its waits are 1 s long-polls)
RECEIVER_STOP_S = 5.0  # bound on the control thread taking in the reports already queued once every role stopped
EXIT_GRACE_S = 5.0  # a replica that exits cleanly may have its last report (the actor's ``done``) still in flight


def run(dcfg: DictConfig, console: Console) -> int:
    """Run one training job; returns the process exit code (0: all steps done)."""
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    token_auth_for_joining(cfg)  # before anything imports ray
    validate(cfg)
    if cfg.launcher == "local":  # under Ray the GPUs are the cluster's, not necessarily this machine's
        check_devices(cfg)
    start = requested_point(cfg) or ResumePoint(None)
    run_dir = Path(cfg.run_dir)
    if start.path is None and (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size:
        raise ConfigError(f"run_dir={cfg.run_dir!r} already holds a run (its metrics.jsonl): continue it with "
                          f"resume=true, or choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    model_path = prepare_model(cfg, console)
    console.print(f"run {run_dir}  model {model_path}  staleness {cfg.flow.staleness}  steps {cfg.flow.steps}")
    if start.path is not None:
        console.print(f"resuming from {start.path}: step {start.version} of {cfg.flow.steps}")
    try:
        with Run(cfg, model_path, console, start) as r:
            return r.supervise()
    except StartError as e:  # nothing ran: the message says what could not start, no traceback needed
        console.print(f"[red]error[/]: {e}")
        return 1


def token_auth_for_joining(cfg: RunConfig) -> None:
    """Joining a Ray cluster: send our auth token when we have one.

    Ray 2.5x clusters require a token by default, but a driver that joins one sends its token only in
    token mode, which Ray reads from RAY_AUTH_MODE when it is imported. Sending a token to a cluster
    without authentication is harmless, so token mode is turned on whenever a token is at hand.
    """
    if cfg.launcher != "ray" or cfg.ray.address is None or "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"


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


def make_tokenize(tokenizer, chat_template: bool):
    if chat_template:
        return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=True)
    return lambda text: tokenizer(text)["input_ids"]


def plan_roles(cfg: RunConfig) -> list[tuple[str, int, object, dict, int]]:
    """(role, replica, role config, extra serve() arguments, torch threads) for every role replica."""
    from roles.tasks import get_task

    reward = dataclasses.replace(cfg.reward, fn=cfg.reward.fn or get_task(cfg.data.task).reward)
    sync = dataclasses.replace(cfg.sync, dtype=cfg.sync.dtype or cfg.rollout.dtype)
    broadcast = None
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang.update == "distributed":
        broadcast = {"servers": cfg.rollout.replicas, "tp": cfg.rollout.sglang.tp_size, "sglang": cfg.rollout.sglang,
                     "backend": "nccl" if cfg.actor.device.startswith("cuda") else "gloo"}
    actor = {"steps": cfg.flow.steps, "staleness": cfg.flow.staleness, "sync": sync, "broadcast": broadcast,
             "samples_every": cfg.tracking.samples_every}
    roles = [("actor", i, cfg.actor, actor, cfg.actor.threads) for i in range(cfg.actor.replicas)]
    roles += [("rollout", i, dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + i), {"sync": sync},
               cfg.rollout.threads) for i in range(cfg.rollout.replicas)]
    roles += [("reward", i, reward, {}, 1) for i in range(cfg.reward.replicas)]
    if cfg.actor.kl_coef > 0:
        roles += [("reference", i, cfg.reference, {"temperature": cfg.rollout.temperature}, cfg.reference.threads)
                  for i in range(cfg.reference.replicas)]
    return roles


class Run:
    """The processes and threads of one run; ``with Run(...)`` guarantees the shutdown path runs."""

    def __init__(self, cfg: RunConfig, model_path: str, console: Console, start: ResumePoint | None = None):
        """``start``: the checkpoint the run continues from (``resume``); None or a path-less point: fresh."""
        self.cfg, self.model_path, self.console = cfg, model_path, console
        self.start = start or ResumePoint(None)
        self.events: queue.Queue = queue.Queue()
        sweep_socket_dirs()
        # ipc paths must stay short (~100 chars); the pid in the name lets a later run remove it if we are killed
        self.sock_dir = tempfile.mkdtemp(prefix=f"rlflow-{os.getpid()}-")
        self.placement = None  # flow/local.py or flow/ray_cluster.py: where the bus and the roles run
        self.tracker = None
        self.feeder = self.feeder_thread = None
        self.issued: set[int] = set()  # groups issued by feeders that were replaced (rewinds)
        self.epoch = 0  # rewinds so far, this run and the ones it resumed
        self.closing = threading.Event()
        self.stopped = threading.Event()  # every role is stopped: the control socket may close
        self.timeline = self.sampler = self.receiver = None  # run_dir/timeline.jsonl and the bus's queue sampler (flow/timeline.py)
        self.busy: Counter = Counter()  # seconds each role spent working, from its reports
        self.reward_errors: Counter = Counter()
        self.work: Counter = Counter()  # samples each role replica processed, from its reports
        self.trained: dict[int, list[str]] = {}  # step -> logical uids it trained (the exactly-once ledger)
        self.trainer: dict = {}  # from the actor's done report: replicas, identical_weights
        self.sync_reports: list[dict] = []  # rollout weight applies since the last step's metrics line
        self.sync_totals: dict[str, dict] = {}  # per rollout replica: bytes from the actor / from peers, applies
        self.supervisor = Supervisor(cfg.supervision)
        self.role_args: dict[tuple[str, int], tuple] = {}  # what each replica was started with (restarts reuse it)
        self.bus = None  # the launcher's own bus client: hands a dead replica's leases back
        self.lease_expiries = 0
        self.interrupted = False  # Ctrl-C: stop at once, no report

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
        plan = plan_roles(cfg)
        self.placement = make_placement(cfg, [(r, i) for r, i, *_ in plan], self.sock_dir, self.console.print)
        bus_address = self.placement.start_bus(ServerConfig(capacity_rows=cfg.flow.bus_capacity_rows,
                                                            capacity_bytes=cfg.flow.bus_capacity_bytes),
                                               functools.partial(self._exited, "bus", 0, None))
        keys_dir = self.placement.keys_dir
        self.bus = BusClient(bus_address, keys_dir=keys_dir)
        schema.declare(self.bus)
        control = self._listen(self.placement.control_address, keys_dir)
        spec = {"bus": bus_address, "control": control, "endpoints": self.placement.endpoints_spec,
                "keys": self.placement.keys, "keys_parent": self.placement.keys_parent,
                "model_path": self.model_path, "run_dir": run_dir, "seed": cfg.seed,
                "wait_seconds": cfg.flow.wait_seconds, "lease_seconds": cfg.flow.lease_seconds,
                "heartbeat_s": cfg.supervision.heartbeat_s, "launcher_pid": os.getpid()}
        for role, replica, role_cfg, extra, threads in plan:
            if role == "rollout":
                extra = {**extra, **self._relay_endpoints(replica)}
            self.role_args[(role, replica)] = (role, replica, role_cfg, extra, {**spec, "threads": threads})
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)  # prompts in (feeder), samples out (tracking)
        self.tokenize = make_tokenize(self.tokenizer, cfg.data.chat_template)
        self.tracker = Tracker(cfg.tracking, run_dir, dataclasses.asdict(cfg), cfg.flow.steps, self.console,
                               keep_steps=self.start.version if self.start.path else None)
        self.timeline = TimelineLog(run_dir)
        self.sampler = BusSampler(bus_address, keys_dir, self.timeline)
        self._continue_from(self.start, [(r, i) for r, i, *_ in plan], rewind=False)
        self.placement.wait_started()
        self._write_processes()

    def _continue_from(self, point: ResumePoint, replicas: list[tuple[str, int]], rewind: bool) -> None:
        """Start ``replicas`` (the actor's resuming from ``point``) and a feeder that skips what ``point``
        trained. The bus holds nothing the run still needs: it is fresh, or the rewind cleared it."""
        if rewind or point.path is not None:  # rows issued from here on are told apart from earlier ones
            self.epoch = max(self.epoch, point.epoch) + 1
        for role, replica in replicas:
            if role == "actor":
                r, i, role_cfg, extra, spec = self.role_args[(role, replica)]
                self.role_args[(role, replica)] = (r, i, role_cfg, {**extra, "resume_from": point.path,
                                                                    "epoch": self.epoch}, spec)
            self._start_role(role, replica)
        self.trained = {s: uids for s, uids in self.trained.items() if s <= point.version}
        for s, uids in point.trained_by_step(self.cfg.rollout.group_size).items():
            self.trained.setdefault(s, uids)  # a kept step whose metrics report never arrived
        cfg = self.cfg
        self.feeder = Feeder(self.bus.address, self.placement.endpoints,
                             prompt_records(cfg.data), self.tokenize,
                             group_size=cfg.rollout.group_size, groups_per_step=cfg.actor.groups_per_step,
                             staleness=cfg.flow.staleness, async_queue_steps=cfg.flow.async_queue_steps,
                             steps=cfg.flow.steps, wait_seconds=cfg.flow.wait_seconds,
                             keys_dir=self.placement.keys_dir, done=point.done_groups(), epoch=self.epoch)
        self.feeder_thread = threading.Thread(target=self._feed, args=(self.feeder,), name="rlflow-feeder",
                                              daemon=True)
        self.feeder_thread.start()

    def _start_role(self, role: str, replica: int) -> None:
        """Start the next incarnation of a replica with the arguments it was first planned with."""
        incarnation = self.supervisor.started(f"{role}-{replica}")
        role_, replica_, role_cfg, extra, spec = self.role_args[(role, replica)]
        self.placement.start_role(role, replica, (role_, replica_, role_cfg, extra, {**spec, "incarnation": incarnation}),
                                  functools.partial(self._exited, role, replica, incarnation))

    def _write_processes(self) -> None:
        """processes.json: every pid of the run as it is now (rewritten after each restart)."""
        (Path(self.cfg.run_dir) / "processes.json").write_text(json.dumps(
            {"launcher": os.getpid(), "kind": self.placement.kind, **self.placement.processes()}, indent=1))

    def _relay_endpoints(self, replica: int) -> dict:
        """The endpoint rollout ``replica`` pulls weight chunks from, and the one it serves (chain or tree)."""
        fanout, replicas = self.cfg.sync.fanout, self.cfg.rollout.replicas
        parent = relay_parent(replica, fanout)
        return {"upstream": None if parent is None else f"weights-{parent}",
                "relay": f"weights-{replica}" if relays_to_others(replica, replicas, fanout) else None}

    def _listen(self, address: str, keys_dir: str | None) -> str:
        """Bind the control socket (role reports -> launcher) on a thread of its own; returns where it listens."""
        bound: queue.Queue = queue.Queue()
        self.receiver = threading.Thread(target=self._receive, args=(address, keys_dir, bound), name="rlflow-control",
                                         daemon=True)
        self.receiver.start()
        result = bound.get(timeout=30)
        if isinstance(result, BaseException):
            raise result
        return result

    def _receive(self, address: str, keys_dir: str | None, bound: queue.Queue) -> None:
        try:
            sock = zmq.Context.instance().socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            if keys_dir is not None:
                security.serve_curve(zmq.Context.instance(), sock, keys_dir)
            sock.bind(address)
            bound.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException as e:
            bound.put(e)
            return
        try:
            while not self.stopped.is_set():  # roles report until they are stopped (their last spans)
                if sock.poll(200):  # the bound only sets how soon this thread notices shutdown
                    self.events.put(("report", sock.recv_json()))
            while sock.poll(0):  # what the stopped roles sent last is queued already
                self.events.put(("report", sock.recv_json()))
        finally:
            sock.close(0)

    def _exited(self, role: str, replica: int, incarnation: int | None, what: str, detail: str | None) -> None:
        self.events.put(("exit", {"role": role, "replica": replica, "incarnation": incarnation, "what": what,
                                  "detail": detail}))

    def _feed(self, feeder: Feeder) -> None:
        try:
            feeder.run()
        except BaseException:
            if feeder.stop.is_set():  # a rewind stopped it mid-put: nothing to report
                return
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
                    kind, ev = None, None
                verdict = None
                if kind == "exit":
                    verdict = self._on_exit(ev)
                elif kind == "report":
                    verdict = self._report(ev)
                for name, silent in self.supervisor.hung():
                    if verdict is None and not self.closing.is_set():
                        role, replica = name.rsplit("-", 1)
                        verdict = self._recover(role, int(replica), f"hung: no heartbeat for {silent:.0f}s "
                                                f"(supervision.hang_s={self.cfg.supervision.hang_s:g})")
                if verdict is not None:
                    return verdict
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping every role[/]")
            self.interrupted = True
            return 130
        finally:
            self._summary(time.monotonic() - t0)

    def _on_exit(self, ev: dict) -> int | None:
        if self.closing.is_set():
            return None
        role, replica = ev["role"], ev["replica"]
        what = f"{ev['what']} before the run was done"
        if role == "bus":
            return self._failed("bus", 0, None, what, f"{ev['detail'] or ''}\nThe bus held the run's rows and "
                                "leases, so the run cannot go on; continue it from its last checkpoint with "
                                "resume=true.".strip())
        if not self.supervisor.current(f"{role}-{replica}", ev["incarnation"]):
            return None  # an incarnation already replaced (killed by the supervisor)
        if ev["what"] == "exited with code 0" and not ev.get("graced"):  # look again once its reports are in
            timer = threading.Timer(EXIT_GRACE_S, self.events.put, args=(("exit", {**ev, "graced": True}),))
            timer.daemon = True
            timer.start()
            return None
        return self._recover(role, replica, what, detail=ev["detail"])

    def _recover(self, role: str, replica: int, what: str, tb: str | None = None, detail: str | None = None,
                 failed: bool = False) -> int | None:
        """Restart a replica that died, failed or hung, if the policy allows; else stop the run (returns 1)."""
        name = f"{role}-{replica}"
        incarnation = self.supervisor.incarnation(name)
        why_not = self.supervisor.may_restart(name, role, failed)
        if why_not is not None:
            self.supervisor.record(name, incarnation, what, "stopped the run", why=why_not)
            restarts = [h for h in self.supervisor.history if h["action"] == "restarted"]
            detail = "\n".join(filter(None, [detail, f"not restarted: {why_not}"] +
                                      [f"earlier: {h['replica']} {h['what']} (restarted)" for h in restarts]))
            return self._failed(role, replica, tb, what, detail)
        if role == "actor":
            return self._rewind(name, incarnation, what, tb, detail)
        t0 = time.monotonic()
        self.placement.kill_role(role, replica, KILL_WAIT_S)  # for sure gone before its leases go back
        returned = self.bus.release(holder_name(role, replica, incarnation))
        self._start_role(role, replica)
        rows = sum(returned.values())
        self._restarted(name, incarnation, what, detail, tb, t0, f"restarted as incarnation {incarnation + 1}; "
                        f"{rows} rows it held went back to the bus", rows_returned=rows)
        return None

    def _rewind(self, name: str, incarnation: int, what: str, tb: str | None, detail: str | None) -> int | None:
        """The trainer died, failed or hung: continue from this run's newest checkpoint.

        Every trainer replica and every rollout replica restarts (the rollouts hold weights of a lineage
        that is being discarded); the bus is cleared, the ledger and metrics.jsonl drop the steps after the
        checkpoint, and a new feeder reissues every group the kept steps did not consume, under new ids.
        Reward and reference replicas go on: a result they put for a cleared row is skipped.
        """
        t0 = time.monotonic()
        point = newest_point(self.cfg.run_dir)
        self.feeder.stop.set()
        self.feeder_thread.join(FEEDER_STOP_S)
        if self.feeder_thread.is_alive():
            return self._failed("feeder", 0, None, "did not stop for a rewind",
                                f"the feeder thread did not return within {FEEDER_STOP_S:.0f}s (blocked in a put "
                                f"to a full bus?), so the trainer could not be restarted after: {name} {what}")
        self.issued |= self.feeder.issued_groups()
        restarted = [(r, i) for r, i in self.role_args if r in ("actor", "rollout")]
        for role, replica in restarted:
            self.placement.kill_role(role, replica, KILL_WAIT_S)
            self.bus.release(holder_name(role, replica, self.supervisor.incarnation(f"{role}-{replica}")))
        cleared = self.bus.clear(everything=True)
        for endpoint in self._trainer_endpoints():
            self.placement.endpoints.withdraw(endpoint)
        lost = max(self.trained, default=0) - point.version
        self.tracker.rewind(point.version)
        self._continue_from(point, restarted, rewind=True)
        self._restarted(name, incarnation, what, detail, tb, t0,
                        f"the trainer restarts from {point.path or 'the start policy'} (step {point.version}; {lost} "
                        f"later steps are trained again), with every rollout replica",
                        rewound_to=point.version, steps_lost=lost, rows_cleared=cleared)
        return None

    def _restarted(self, name: str, incarnation: int, what: str, detail: str | None, tb: str | None, t0: float,
                   said: str, **facts) -> None:
        """The end of every restart: wait for the new incarnations, write their pids, record it, say it."""
        self.placement.wait_started()
        self._write_processes()
        took = time.monotonic() - t0
        self.supervisor.record(name, incarnation, what, "restarted", restart_s=round(took, 3), **facts)
        role, replica = name.rsplit("-", 1)
        self.timeline.instant(role, int(replica), "rewind" if "rewound_to" in facts else "restart", ago_s=took,
                              what=what, restart_s=round(took, 3), **facts)
        self.console.print(f"[yellow]{name} {what}[/]" + (f" ({detail})" if detail else "") + f": {said}",
                           highlight=False)
        if tb:
            self.console.print(tb, highlight=False)

    def _trainer_endpoints(self) -> list[str]:
        """Endpoints the trainer and rollout replicas advertise (withdrawn before they restart)."""
        names = ["weights", "trainer", "trainer-broadcast"]
        return names + [f"{p}-{i}" for p in ("weights", "sglang") for i in range(self.cfg.rollout.replicas)]

    def _report(self, ev: dict) -> int | None:
        kind, name = ev["kind"], f"{ev['role']}-{ev['replica']}"
        if kind == "heartbeat" and self.timeline is not None:  # a gone incarnation's last spans are history too
            self.timeline.heartbeat(ev)
        if ev["role"] != "feeder":
            if not self.supervisor.current(name, ev.get("incarnation")):
                return None  # sent by an incarnation that is gone: its successor reports for itself
            self.supervisor.heard(name, kind)
        if kind == "heartbeat":
            return None
        if kind == "metrics":
            self.trained[ev["step"]] = [logical_uid(u) for u in ev.pop("uids")]
            if "examples" in ev:
                self.tracker.log_samples(ev["step"], self._decoded(ev.pop("examples"), ev["step"]))
            self.tracker.log({**ev, **sync_summary(self.sync_reports),
                              "supervision/restarts": len(self.supervisor.history)})
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
            self.work[f"{kind}-{ev['replica']}"] += ev["samples"]
        elif kind == "reward_error":
            self._reward_error(ev)
        elif kind == "lease_expired":
            self.lease_expiries += 1
        elif kind == "failed":
            if ev["role"] == "feeder" or self.closing.is_set():
                return self._failed(ev["role"], ev["replica"], ev.get("traceback"), "failed")
            return self._recover(ev["role"], ev["replica"], "failed", tb=ev.get("traceback"), failed=True)
        elif kind == "done":
            self.closing.set()
            self.trainer = {"replicas": ev["replicas"], "identical_weights": ev["identical_weights"]}
            if not ev["identical_weights"]:
                self.console.print("[red]the trainer replicas ended with different weights[/]")
                return 1
            self.console.print(f"[green]done[/]: {ev['version']} steps; checkpoint in {self.cfg.run_dir}/checkpoints/final")
            return 0
        return None

    def _decoded(self, examples: list[dict], step: int) -> list[dict]:
        """The actor's sample of a step (token ids) as text, for samples.jsonl and the W&B table."""
        text = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [{"prompt": text(e["prompt_ids"]), "response": text(e["response_ids"]), "reward": e["reward"],
                 "version": e["version_start"], "staleness": step - 1 - e["version_start"]} for e in examples]

    def _reward_error(self, ev: dict) -> None:
        first = self.reward_errors[ev["error"]] == 0
        self.reward_errors[ev["error"]] += 1
        if first:  # each distinct error once, with its row; the count goes to the summary and metrics
            self.console.print(f"[yellow]reward function raised on row {ev['uid']}[/] (prompt {ev['prompt']!r}, "
                               f"response {ev['response']!r}); the sample is skipped:\n{ev['traceback']}")

    def _failed(self, role: str, replica: int, tb: str | None, what: str, detail: str | None = None) -> int:
        self.closing.set()
        body = tb or "(no traceback: the process died without reporting; see its output above)"
        if detail:
            body = f"{detail}\n{body}"
        self.console.print(Panel(body, title=f"role {role}-{replica} {what}", border_style="red"))
        return 1

    def _ledger(self) -> dict:
        """The run's own exactly-once accounting: every issued sample against the steps that consumed it."""
        groups = self.issued | (self.feeder.issued_groups() if self.feeder is not None else set())
        issued = {uid(i, j) for i in groups for j in range(self.cfg.rollout.group_size)}
        trained = Counter(u for uids in self.trained.values() for u in uids)
        return {"issued": len(issued), "trained": len(trained),
                "trained_more_than_once": sum(1 for n in trained.values() if n > 1),
                "issued_not_trained": len(issued - trained.keys()),
                "trained_not_issued": len(trained.keys() - issued)}

    def _summary(self, wall: float) -> None:
        summary = {"wall_s": round(wall, 3), "model_path": self.model_path, "launcher": self.cfg.launcher,
                   "busy_s": dict(self.busy), "samples_by_replica": dict(self.work), "reward_errors": sum(self.reward_errors.values()),
                   "samples": self._ledger(), "trainer": self.trainer, "sync": self.sync_totals,
                   "supervision": {"restarts": self.supervisor.history, "lease_expiries": self.lease_expiries},
                   "cores": machine_cores(),
                   "timeline": {"spans_dropped": self.timeline.spans_dropped if self.timeline else {}}}
        (Path(self.cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))

    # ------------------------------------------------------------------ shut down
    def _shutdown(self) -> None:
        self.closing.set()
        if self.feeder is not None:
            self.feeder.stop.set()
        if self.sampler is not None:
            self.sampler.close()
        if self.bus is not None:
            self.bus.close()
        if self.placement is not None:
            self.placement.stop(self.cfg.flow.shutdown_seconds, lambda m: self.console.print(f"[yellow]{m}[/]"))
        self.stopped.set()
        if self.receiver is not None:
            self.receiver.join(RECEIVER_STOP_S)
        if self.timeline is not None:
            self._drain_spans()
            self.timeline.close()
            self._final_report()
        if self.tracker is not None:
            self.tracker.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


    def _final_report(self) -> None:
        """Write run_dir/report (tracking.report), print the capacity advice, send the figures to W&B."""
        if self.cfg.tracking.report and not self.interrupted and self.tracker is not None:
            from flow.report import report_at_end

            report_at_end(self.cfg.run_dir, self.console, self.tracker, max(self.trained, default=0))

    def _drain_spans(self) -> None:
        """Write the spans of the heartbeats that arrived after supervision ended (each role's last)."""
        while True:
            try:
                kind, ev = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "report" and ev.get("kind") == "heartbeat":
                self.timeline.heartbeat(ev)


def sweep_socket_dirs() -> None:
    """Remove the socket directories of launchers that were killed (a clean stop removes its own)."""
    for d in Path(tempfile.gettempdir()).glob("rlflow-*-*"):
        pid = d.name.split("-")[1]
        if not pid.isdigit() or not d.is_dir() or d.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def make_placement(cfg: RunConfig, roles: list[tuple[str, int]], sock_dir: str, log):
    """Where the bus and the roles run: processes of this machine, or Ray actors (``launcher=ray``)."""
    if cfg.launcher == "ray":
        from flow.ray_cluster import RayPlacement

        return RayPlacement(cfg, roles, sock_dir, log)
    from flow.local import LocalPlacement

    return LocalPlacement(sock_dir)
