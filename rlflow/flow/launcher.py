"""The launcher: one run, top to bottom — prepare, start the bus and the roles, feed, supervise, shut down.

    rlflow (Hydra) ──► run(cfg)
        prepare   : settle the settings (a resume's own: flow/resume.py) and check them, read and check
                    the data file (flow/data.py), build or locate the model; only then make the run
                    directory (nothing is written for a run refused here)
        start     : bus server ─ control socket (roles → launcher reports) ─ role replicas
                    (actor ×1, rollout ×N, reward ×M, reference ×R when kl_coef > 0), placed by
                    flow/placement/local.py (processes of this machine) or flow/placement/ray_cluster.py (launcher=ray)
        feed      : the feeder thread puts prompt groups under admission control (flow/feeder.py)
        supervise : one event queue: reports, heartbeats (carrying the roles' timeline spans: written to
                    timeline.jsonl, flow/observe/timeline.py), metrics, process exits, feeder failure, Ctrl-C;
                    a replica that dies, fails or hangs is restarted by policy (flow/placement/supervisor.py)
        shut down : stop the feeder, stop every role (kill what is left after shutdown_seconds), take
                    their last spans, stop the bus, write the report and print the capacity advice
                    (flow/observe/report.py), close tracking, remove the socket directory

Invariants: the run ends on the actor's ``done`` (success, unless no step had a sample to train), on a
failure supervision may not recover (the bus, a replica past its restart budget, a start-up error, a
reward function failing on every sample of ``reward.max_failed_steps`` steps), or on Ctrl-C; in every case every
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
import math
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel

from rlflow.flow.observe.capacity import machine_cores
from rlflow.flow.config import ConfigError, RunConfig, StartError
from rlflow.flow.data import REPLACEMENT_STREAM, Prompts, check_tokens, load_prompts, load_sources, prompt_records
from rlflow.flow.control import ControlReceiver
from rlflow.flow.feeder import Feeder, logical_group
from rlflow.flow.periodic_eval import PeriodicEval
from rlflow.flow.ledger import Ledger
from rlflow.flow.resume import (ResumePoint, Resumed, newest_point, record_resume, requested_point, require_same_shape,
                         resume_settings)
from rlflow.flow.placement.supervisor import Supervisor
from rlflow.flow.observe.timeline import BusSampler, TimelineLog
from rlflow.flow.observe.tracking import SyncTally, Tracker, plain, say
from rlflow.flow.reward_health import RewardHealth
from rlflow.flow.placement.plan import ReplicaPlan, Wiring
from rlflow.flow.placement.worker import holder_name
from rlflow.roles.config import ActorArgs, Broadcast, ReferenceArgs, RewardArgs, RolloutArgs
from rlflow.roles import reports, schema
from rlflow.roles.context import shard_endpoint
from rlflow.sync.config import relay_parent, relays_to_others
from rlflow.transfer import BusClient, ServerConfig
from rlflow.transfer.channel import ChannelKey
from rlflow.transfer.lifetime import raise_open_file_limit

KILL_WAIT_S = 30.0  # bound on a killed replica's process (or Ray actor) being reported gone
FEEDER_STOP_S = 30.0  # bound on the feeder thread returning once asked to (its waits are 1 s long-polls)
RECEIVER_STOP_S = 5.0  # bound on the control thread taking in the reports already queued once every role stopped
SHOWN_REFUSALS = 5  # refused control reports shown in full; the rest are counted (a flood must not flood the console)
EXIT_GRACE_S = 5.0  # a replica that exits cleanly may have its last report (the actor's ``done``) still in flight


def run(dcfg: DictConfig, console: Console, overrides: list[str] = ()) -> int:
    """Run one training job; returns the process exit code (0: all steps done).

    ``overrides``: the command line's ``key=value`` arguments (a resume applies only the safe ones to the
    run's saved settings: ``flow/resume.py``). Everything that can be checked is checked before anything
    is written or started: the settings, the resume point, the data file, the model (a ConfigError then
    leaves no run directory behind).
    """
    dcfg, cfg, resumed, start = settle(dcfg, overrides)
    raise_open_file_limit()  # the launcher's sockets (control, its bus client, every role's feeds) need descriptors
    from rlflow.flow.placement.local import start_forkserver, stop_forkserver

    if cfg.launcher == "local":  # started by the command line already; its imports overlap preparing the run
        start_forkserver()
    else:  # Ray places every role itself
        stop_forkserver()
    prompts = load_sources(cfg.data) if cfg.data.sources else load_prompts(cfg.data)
    if cfg.data.curriculum is not None:
        curriculum_fn(cfg)  # a bad path fails here, before any process starts
    model_path = prepare_model(cfg, prompts, console)
    if start.path is not None:
        require_same_shape(start.path, model_path)
    tokenizer = load_tokenizer(model_path)
    for loaded in prompts if isinstance(prompts, list) else [prompts]:
        if loaded is not None:
            check_tokens(tokenizer, loaded)
    write_settings(Path(cfg.run_dir), dcfg, resumed, start)
    say(console, f"run {cfg.run_dir}  model {model_path}  staleness {cfg.flow.staleness}  steps {cfg.flow.steps}")
    if start.path is not None:
        changed = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in resumed.changed.items())
        say(console, f"resuming from {start.path}: step {start.version} of {cfg.flow.steps}"
                     + (f" with the settings of {resumed.saved}" if resumed.saved else
                        " (no config.yaml beside it: with the settings of this command line)")
                     + (f"; changed: {changed}" if changed else ""))
    try:
        with Run(cfg, model_path, console, start, prompts, tokenizer) as r:
            return r.supervise()
    except StartError as e:  # nothing ran: the message says what could not start, no traceback needed
        say(console, str(e), "error")
        return 1


def settle(dcfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, RunConfig, Resumed | None, ResumePoint]:
    """The run's settings (a resume's own, with the command line's safe changes), checked; where it starts."""
    dcfg, resumed = resume_settings(dcfg, list(overrides))
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    token_auth_for_joining(cfg)  # before anything imports ray
    cfg.check()
    if cfg.launcher == "local":  # under Ray the GPUs are the cluster's, not necessarily this machine's
        check_devices(cfg)
    start = requested_point(cfg) or ResumePoint(None)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    if start.path is None and metrics.exists() and metrics.stat().st_size:
        raise ConfigError(f"run_dir={cfg.run_dir!r} already holds a run (its metrics.jsonl): continue it with "
                          f"resume=true, or choose another run_dir")
    return dcfg, cfg, resumed, start


def write_settings(run_dir: Path, dcfg: DictConfig, resumed: Resumed | None, start: ResumePoint) -> None:
    """Make the run directory; write config.yaml (a fresh run, or a resume's safe changes) and resumes.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is None or resumed.changed or not (run_dir / "config.yaml").exists():
        saved = OmegaConf.to_container(dcfg, resolve=True)
        saved["resume"] = None  # the file describes the experiment; how it was continued is in resumes.jsonl
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    if resumed is not None:
        record_resume(run_dir, resumed, start.version)


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
    """A role on ``cuda`` needs a GPU torch sees (torch is imported only to ask that)."""
    for name, device in (("rollout.device", cfg.rollout.device), ("actor.device", cfg.actor.device),
                         ("reference.device", cfg.reference.device)):
        if not device.startswith("cuda"):
            continue
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{name}={device!r} but torch sees no GPU here; use {name}=cpu")


def prepare_model(cfg: RunConfig, prompts: Prompts | list[Prompts | None] | None, console: Console) -> str:
    """The start policy's checkpoint directory: ``model.path``, or the tiny model built (once) for the data
    (``prompts``: a data file's records, None for a built-in task, a list for ``data.sources``)."""
    if cfg.model.path is not None:
        return cfg.model.path
    from rlflow.engines.tiny import build_tiny_model, data_demos, mixed_demos, task_demos

    if isinstance(prompts, list):  # a mixture: each source's demonstrations, by weight
        d = cfg.data
        demos = mixed_demos([task_demos(s.task, d.min_digits, d.max_digits) if p is None
                             else data_demos(p.records, cfg.model.tiny.answer_key) for s, p in zip(d.sources, prompts)],
                            [s.weight for s in d.sources])
    elif prompts is None:
        demos = task_demos(cfg.data.task, cfg.data.min_digits, cfg.data.max_digits)
    else:
        demos = data_demos(prompts.records, cfg.model.tiny.answer_key)
        say(console, "model: a tiny model built here for data.path (its byte tokenizer reads any text); warm-start: "
                     + (f"on the data's {cfg.model.tiny.answer_key!r} column" if demos.sample else
                        f"none, the data has no {cfg.model.tiny.answer_key!r} column (model.tiny.answer_key), so the "
                        f"policy starts random") + ". For a real policy give model.path=CHECKPOINT_DIR.", "note")
    return build_tiny_model(cfg.model.tiny, demos, cfg.model.cache_dir, log=lambda m: say(console, m))


def load_tokenizer(model_path: str):
    """The start checkpoint's tokenizer; one that does not load is a ConfigError naming model.path.

    A model built here is read without transformers (``engines/tiny.ByteTokenizerFile``), so the launcher
    of the default recipe never imports torch: the forkserver has a core to itself while it imports it."""
    from rlflow.engines.tiny import ByteTokenizerFile

    if (tokenizer := ByteTokenizerFile.of(model_path)) is not None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a directory it cannot read
        raise ConfigError(f"model.path={model_path!r}: its tokenizer does not load ({type(e).__name__}: "
                          f"{str(e).strip()[:300]})") from None


def make_tokenize(tokenizer, chat_template: bool):
    if chat_template:
        from rlflow.roles.turns import chat_ids

        return lambda text: chat_ids(tokenizer, [{"role": "user", "content": text}])
    return lambda text: tokenizer(text)["input_ids"]


def reward_fn(cfg: RunConfig) -> str:
    """The dotted path of the run's reward function: ``reward.fn``; else with an environment the sum of its
    step rewards (``env_reward``), else the built-in task's own."""
    from rlflow.tasks.builtin import get_task

    if cfg.reward.fn:
        return cfg.reward.fn
    if cfg.env.enabled:
        return "rlflow.tasks.rewards.env_reward"
    if cfg.data.sources:  # each source has its own (``source_rewards``); this names the first's
        return next(iter(source_rewards(cfg).values()))
    return get_task(cfg.data.task).reward


def curriculum_fn(cfg: RunConfig):
    """data.curriculum's function; a path that does not import is a ConfigError naming the field."""
    from rlflow.plugins import load_object

    try:
        return load_object(cfg.data.curriculum, "data.curriculum")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def source_rewards(cfg: RunConfig) -> dict[str, str]:
    """``data.sources``: each source's reward function (its own ``reward``, else ``reward.fn``, else its task's)."""
    from rlflow.tasks.builtin import get_task

    return {s.name: s.reward or (get_task(s.task).reward if s.task is not None else cfg.reward.fn)
            for s in cfg.data.sources}  # checked: a file source has its own reward or reward.fn


def with_server_key(rollout):
    """The rollout config the replicas get. With update=distributed the trainer pushes weights into the
    servers the replicas launch, so it needs their API key: the launcher makes one per run (unless
    ``rollout.sglang.api_key`` gives one). It lives in the plans only, never in the run's saved config.
    Otherwise a replica makes its server's key itself (``engines/sglang.server_key``) and none is shipped."""
    s = rollout.sglang
    if rollout.engine != "sglang" or s.update != "distributed" or s.url is not None or s.api_key is not None:
        return rollout
    return dataclasses.replace(rollout, sglang=dataclasses.replace(rollout.sglang, api_key=secrets.token_urlsafe(32)))


def replica_budget(cfg) -> int:
    """data.filter_budget as the replacements one trainer replica may ask for per step (0: off)."""
    share = cfg.actor.groups_per_step // cfg.actor.replicas
    return math.ceil(cfg.data.filter_budget * share) if cfg.data.filter_groups else 0


def plan_roles(cfg: RunConfig) -> list[ReplicaPlan]:
    """Every role replica of the run, with its config and run-level arguments (wiring comes at start)."""
    reward = dataclasses.replace(cfg.reward, fn=reward_fn(cfg))
    sync = dataclasses.replace(cfg.sync, dtype=cfg.sync.dtype or cfg.rollout.dtype)
    rollout = with_server_key(cfg.rollout)
    broadcast = None
    if rollout.engine == "sglang" and rollout.sglang.update == "distributed":
        broadcast = Broadcast(servers=rollout.replicas, tp=rollout.sglang.tp_size, sglang=rollout.sglang,
                              backend="nccl" if cfg.actor.device.startswith("cuda") else "gloo")
    episodes = cfg.env.enabled
    # a sharded trainer's ranks each publish their own rows (no gather), unless sglang takes whole weights
    shards = cfg.actor.replicas if cfg.actor.parallel == "fsdp" and broadcast is None else 1
    actor = ActorArgs(steps=cfg.flow.steps, staleness=cfg.flow.staleness, sync=sync, sampling=cfg.rollout.sampling(),
                      broadcast=broadcast, samples_every=cfg.tracking.samples_every, episodes=episodes,
                      in_flight=cfg.rollout.update == "in_flight",
                      filter_fn=cfg.data.filter_fn if cfg.data.filter_groups else None,
                      filter_budget=replica_budget(cfg), sources=[s.name for s in cfg.data.sources],
                      curriculum=cfg.data.curriculum is not None,
                      weight_shards=shards)
    plans = [ReplicaPlan("actor", i, cfg.actor, actor, cfg.actor.threads) for i in range(cfg.actor.replicas)]
    plans += [ReplicaPlan("rollout", i, dataclasses.replace(rollout, seed=rollout.seed + i),
                          RolloutArgs(sync, *relay_endpoints(i, rollout.replicas, cfg.sync.fanout),
                                      env=cfg.env if episodes else None, chat_template=cfg.data.chat_template,
                                      weight_shards=shards, lora=cfg.actor.lora if cfg.actor.lora.enabled else None),
                          rollout.threads) for i in range(rollout.replicas)]
    sources = source_rewards(cfg) if cfg.data.sources else None
    plans += [ReplicaPlan("reward", i, reward, RewardArgs(episodes, sources), 1) for i in range(cfg.reward.replicas)]
    if cfg.actor.kl_coef > 0:
        plans += [ReplicaPlan("reference", i, cfg.reference, ReferenceArgs(cfg.rollout.temperature, episodes),
                              cfg.reference.threads) for i in range(cfg.reference.replicas)]
    return plans


def relay_endpoints(replica: int, replicas: int, fanout: int) -> tuple[str | None, str | None]:
    """The endpoint rollout ``replica`` pulls weight chunks from, and the one it serves (chain or tree)."""
    parent = relay_parent(replica, fanout)
    return (None if parent is None else f"weights-{parent}",
            f"weights-{replica}" if relays_to_others(replica, replicas, fanout) else None)


class Run:
    """The processes and threads of one run; ``with Run(...)`` guarantees the shutdown path runs."""

    def __init__(self, cfg: RunConfig, model_path: str, console: Console, start: ResumePoint, prompts: Prompts | None,
                 tokenizer):
        """``start``: the checkpoint the run continues from (``resume``; a path-less point: fresh);
        ``prompts``: the data file's records (None: the built-in task); ``tokenizer``: the start checkpoint's."""
        self.cfg, self.model_path, self.console = cfg, model_path, console
        self.start, self.prompts, self.tokenizer = start, prompts, tokenizer  # tokenizer: prompts in, samples out
        self.reward_fn = reward_fn(cfg)
        self.events: queue.Queue = queue.Queue()
        sweep_socket_dirs()
        # ipc paths must stay short (~100 chars); the pid in the name lets a later run remove it if we are killed
        self.sock_dir = tempfile.mkdtemp(prefix=f"rlflow-{os.getpid()}-")
        self.placement = None  # flow/placement/local.py or flow/placement/ray_cluster.py: where the bus and the roles run
        self.tracker = None
        self.evals = None  # PeriodicEval (eval.every): checkpoints scored on held-out prompts as the run goes
        self.feeder = self.feeder_thread = None
        self.epoch = 0  # rewinds so far, this run and the ones it resumed
        self.closing = threading.Event()
        self.stopped = threading.Event()  # every role is stopped: the control socket may close
        self.timeline = self.sampler = self.receiver = None  # run_dir/timeline.jsonl and the bus's queue sampler (flow/observe/timeline.py)
        self.busy: Counter = Counter()  # seconds each role spent working, from its reports
        self.reward_health = RewardHealth(self.reward_fn, cfg.reward.max_failed_steps,
                                          cfg.env.what if cfg.env.enabled else None)  # flow/reward_health.py
        self.work: Counter = Counter()  # samples each role replica processed, from its reports
        self.ledger = Ledger(cfg.rollout.group_size)  # the exactly-once accounting (flow/ledger.py)
        self.replacements_asked: dict[int, int] = {}  # step (0-based) -> replacement groups issued for it
        self.prompt_history: dict[str, list] = {}  # data.curriculum: prompt -> [groups, reward sum] trained so far
        self.curriculum_logged = 0  # prompts the curriculum refused, as of the last step's metrics
        self.trainer: dict = {}  # from the actor's done report: replicas, identical_weights
        self.sync = SyncTally()  # the rollouts' weight applies: per step line and per replica (observe/tracking.py)
        self.supervisor = Supervisor(cfg.supervision)
        self.plans: dict[tuple[str, int], ReplicaPlan] = {}  # what each replica was started with (restarts reuse it)
        self.bus = None  # the launcher's own bus client: hands a dead replica's leases back
        self.lease_expiries = 0
        self.refused_reports = 0  # reports the control socket refused (a confused or hostile sender)
        self.tokens: dict[str, str] = {}  # who -> its bus credential (roles/schema.grants), made at start
        self.channel_secret = secrets.token_bytes(32)  # the weight channel's key: actor, rollouts and feeder only
        self.id_nonce = secrets.token_hex(4)  # every row id of this run carries it: no id is known ahead of the feeder
        self.interrupted = False  # Ctrl-C: stop at once (the report of what was logged is still written)

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
        self.placement = make_placement(cfg, [(p.role, p.replica) for p in plan], self.sock_dir,
                                        lambda m: say(self.console, m))
        # A credential per part of the run: what each may do on the bus is roles/schema.grants.
        grants = schema.grants()
        self.tokens = {who: secrets.token_hex(16) for who in grants}
        bus_address = self.placement.start_bus(
            ServerConfig(capacity_rows=cfg.flow.bus_capacity_rows, capacity_bytes=cfg.flow.bus_capacity_bytes,
                         grants={self.tokens[who]: grant for who, grant in grants.items()}),
            functools.partial(self._exited, "bus", 0, None))
        keys_dir = self.placement.launcher_keys  # in memory; the placement's key directory is for `rlflow bus stats`
        self.bus = BusClient(bus_address, keys_dir=keys_dir, token=self.tokens["launcher"])
        say(self.console, f"bus {bus_address}  (`rlflow bus stats {run_dir}` shows what it holds)")
        schema.declare(self.bus)
        self.receiver = ControlReceiver(self.placement.control_address, keys_dir, self.events, self.stopped,
                                        tokens=self.tokens)
        control = self.receiver.address
        wiring = Wiring(bus=bus_address, control=control, endpoints=self.placement.endpoints_spec,
                        keys=None, model_path=self.model_path,  # under Ray each actor makes its own
                        run_dir=run_dir, seed=cfg.seed, wait_seconds=cfg.flow.wait_seconds,
                        lease_seconds=cfg.flow.lease_seconds, steps=cfg.flow.steps,
                        heartbeat_s=cfg.supervision.heartbeat_s,
                        launcher_pid=os.getpid(), env_actors=self.placement.env_actors)
        self.plans = {(p.role, p.replica): p.replace(wiring=wiring, bus_token=self.tokens[p.role],
                                                     channel_secret=self.channel_secret if p.role in schema.CHANNEL_ROLES else None)
                      for p in plan}
        self.tokenize = make_tokenize(self.tokenizer, cfg.data.chat_template)
        self.tracker = Tracker(cfg.tracking, run_dir, dataclasses.asdict(cfg), cfg.flow.steps, self.console,
                               keep_steps=self.start.version if self.start.path else None)
        if cfg.eval.every:
            self.evals = PeriodicEval(cfg, run_dir, lambda text, label: say(self.console, text, label))
        self.timeline = TimelineLog(run_dir)
        self.sampler = BusSampler(bus_address, keys_dir, self.timeline)
        self._continue_from(self.start, list(self.plans), rewind=False)
        self.placement.wait_started()
        self._write_processes()

    def _continue_from(self, point: ResumePoint, replicas: list[tuple[str, int]], rewind: bool) -> None:
        """Start ``replicas`` (the actor's resuming from ``point``) and a feeder that skips what ``point``
        trained. The bus holds nothing the run still needs: it is fresh, or the rewind cleared it."""
        if rewind or point.path is not None:  # rows issued from here on are told apart from earlier ones
            self.epoch = max(self.epoch, point.epoch) + 1
        for role, replica in replicas:
            if role == "actor":
                p = self.plans[(role, replica)]
                self.plans[(role, replica)] = p.replace(args=dataclasses.replace(p.args, resume_from=point.path,
                                                                                 epoch=self.epoch))
            self._start_role(role, replica)
        self.ledger.rewind(point.version)
        self.replacements_asked = {s: n for s, n in self.replacements_asked.items() if s < point.version}
        self.reward_health.rewound()
        # a kept step whose metrics report never arrived (or a resumed one)
        self.ledger.adopt(point.trained_by_step(self.cfg.rollout.group_size), point.skipped(), point.filtered())
        cfg = self.cfg
        replacements = prompt_records(cfg.data, self.prompts, REPLACEMENT_STREAM) if cfg.data.filter_groups else None
        curriculum = (cfg.data.curriculum, curriculum_fn(cfg)) if cfg.data.curriculum is not None else None
        self.feeder = Feeder(self.bus.address, self.placement.endpoints,
                             prompt_records(cfg.data, self.prompts), self.tokenize,
                             group_size=cfg.rollout.group_size, groups_per_step=cfg.actor.groups_per_step,
                             staleness=cfg.flow.staleness, async_queue_steps=cfg.flow.async_queue_steps,
                             steps=cfg.flow.steps, wait_seconds=cfg.flow.wait_seconds,
                             keys_dir=self.placement.launcher_keys, done=point.done_groups(), epoch=self.epoch,
                             token=self.tokens["feeder"], channel_key=ChannelKey(self.channel_secret),
                             nonce=self.id_nonce, replacements=replacements, replaced=point.done_replacements(),
                             curriculum=curriculum, history=self.prompt_history, mixture=bool(cfg.data.sources))
        self.curriculum_logged = 0
        self.feeder_thread = threading.Thread(target=self._feed, args=(self.feeder,), name="rlflow-feeder",
                                              daemon=True)
        self.feeder_thread.start()

    def _start_role(self, role: str, replica: int) -> None:
        """Start the next incarnation of a replica with the arguments it was first planned with."""
        incarnation = self.supervisor.started(f"{role}-{replica}")
        self.placement.start_role(self.plans[(role, replica)].replace(incarnation=incarnation),
                                  functools.partial(self._exited, role, replica, incarnation))

    def _write_processes(self) -> None:
        """processes.json: every pid of the run as it is now (rewritten after each restart), and where its
        bus listens (``rlflow bus stats RUN_DIR`` reads it)."""
        (Path(self.cfg.run_dir) / "processes.json").write_text(json.dumps(
            {"launcher": os.getpid(), "kind": self.placement.kind, "bus_address": self.bus.address,
             "keys_dir": self.placement.keys_dir, **self.placement.processes()}, indent=1))

    def _exited(self, role: str, replica: int, incarnation: int | None, what: str, detail: str | None) -> None:
        self.events.put(("exit", {"role": role, "replica": replica, "incarnation": incarnation, "what": what,
                                  "detail": detail}))

    def _feed(self, feeder: Feeder) -> None:
        try:
            feeder.run()
        except BaseException:
            if feeder.stop.is_set():  # a rewind stopped it mid-put: nothing to report
                return
            self.events.put(("feeder_failed", traceback.format_exc()))

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
                elif kind == "feeder_failed":
                    verdict = self._failed("feeder", 0, ev, "failed")
                elif kind == "bad_report":
                    self._bad_report(f"refused a report: {ev['why']}", ev["head"])
                for name, silent in self.supervisor.hung():
                    if verdict is None and not self.closing.is_set():
                        role, replica = name.rsplit("-", 1)
                        verdict = self._recover(role, int(replica), f"hung: no heartbeat for {silent:.0f}s "
                                                f"(supervision.hang_s={self.cfg.supervision.hang_s:g})")
                if self.evals is not None and verdict is None:
                    for row in self.evals.poll():
                        self.tracker.log_eval(row)
                if verdict is not None:
                    return verdict
        except KeyboardInterrupt:
            say(self.console, "interrupted: stopping every role", style="yellow")
            self.interrupted = True
            return 130
        finally:
            self._summary(time.monotonic() - t0)
            if (words := self.reward_health.closing_words()) is not None:
                say(self.console, words, "warning")

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
        """The trainer died, failed or hung: continue from this run's newest checkpoint (or, before this
        launcher wrote one, from where it started: a resumed run's checkpoint, or the start policy).

        Every trainer replica and every rollout replica restarts (the rollouts hold weights of a lineage
        that is being discarded); the bus is cleared, the ledger and metrics.jsonl drop the steps after the
        checkpoint, and a new feeder reissues every group the kept steps did not consume, under new ids.
        Reward and reference replicas go on: a result they put for a cleared row is skipped.
        """
        t0 = time.monotonic()
        point = newest_point(self.cfg.run_dir)
        if point.version < self.start.version or point.path is None:  # resumed into a new run_dir, no checkpoint yet
            point = self.start
        self.feeder.stop.set()
        self.feeder_thread.join(FEEDER_STOP_S)
        if self.feeder_thread.is_alive():
            return self._failed("feeder", 0, None, "did not stop for a rewind",
                                f"the feeder thread did not return within {FEEDER_STOP_S:.0f}s (blocked in a put "
                                f"to a full bus?), so the trainer could not be restarted after: {name} {what}")
        self.ledger.replaced_issued |= self.feeder.issued_groups()
        restarted = [(r, i) for r, i in self.plans if r in ("actor", "rollout")]
        for role, replica in restarted:
            self.placement.kill_role(role, replica, KILL_WAIT_S)
            self.bus.release(holder_name(role, replica, self.supervisor.incarnation(f"{role}-{replica}")))
        cleared = self.bus.clear(everything=True)
        for endpoint in self._trainer_endpoints():
            self.placement.endpoints.withdraw(endpoint)
        lost = self.ledger.last_step - point.version
        self.tracker.rewind(point.version)
        if self.evals is not None:
            self.evals.rewind(point.version)
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
        say(self.console, f"{name} {what}" + (f" ({detail})" if detail else "") + f": {said}", style="yellow")
        if tb:
            say(self.console, tb)

    def _trainer_endpoints(self) -> list[str]:
        """Endpoints the trainer and rollout replicas advertise (withdrawn before they restart)."""
        names = ["weights", "trainer", "trainer-broadcast"]
        names += [f"{p}-{i}" for p in ("weights", "sglang") for i in range(self.cfg.rollout.replicas)]
        if self.cfg.actor.parallel == "fsdp":  # every rank's channel and each relay of it (roles/context.shard_endpoint)
            names += [shard_endpoint(n, r) for n in ["weights", *(f"weights-{i}" for i in range(self.cfg.rollout.replicas))]
                      for r in range(1, self.cfg.actor.replicas)]
        return names

    def _report(self, ev: dict) -> int | None:
        kind, name = ev["kind"], f"{ev['role']}-{ev['replica']}"
        if kind == reports.HEARTBEAT and self.timeline is not None:  # a gone incarnation's last spans are history too
            self.timeline.heartbeat(ev)
        if not self.supervisor.current(name, ev.get("incarnation")):
            return None  # sent by an incarnation that is gone: its successor reports for itself
        self.supervisor.heard(name, kind)
        if kind == reports.HEARTBEAT:
            return None
        if kind == reports.REPLACE:  # dynamic sampling dropped groups of the step the actor fills
            return self._replace(ev)
        if kind == reports.METRICS:
            self.ledger.record(ev["step"], ev.pop("uids"), ev.pop("skipped_uids"), ev.pop("filtered_uids", []))
            if self.cfg.data.curriculum is not None:
                ev.update(self._curriculum(ev.pop("group_rewards", [])))
            if "examples" in ev:
                self.tracker.log_samples(ev["step"], self._decoded(ev.pop("examples"), ev["step"]))
            self.tracker.log({**ev, **self.sync.take_step(), "supervision/restarts": len(self.supervisor.history),
                              **(self.evals.take_pending() if self.evals else {})})
            if self.evals:
                self.evals.due(ev["step"])
            verdict = self.reward_health.after_step(ev)
            if verdict is not None:
                title, why, tb = verdict
                return self._failed("reward", 0, tb, "", why, title=title)
        elif kind == reports.SYNC:
            self.sync.add(ev)
            if "error" in ev:
                say(self.console, f"rollout-{ev['replica']} refused {ev['object']}: {ev['error']}; it resyncs from the "
                                  f"keyframe", style="yellow")
        elif kind == reports.WORK:
            self.busy[ev["role"]] += ev["seconds"]
            self.work[name] += ev["samples"]
            self.reward_health.count(ev.get("errors", {}))
        elif kind == reports.REWARD_ERROR:
            if (first := self.reward_health.first_of_its_kind(ev)) is not None:
                say(self.console, first, "warning")
                if ev["traceback"]:
                    say(self.console, ev["traceback"].rstrip())
        elif kind == reports.LEASE_EXPIRED:
            self.lease_expiries += 1
        elif kind == reports.ENV_ERROR:  # one episode failed (roles/episodes.py); the first of each kind in full
            if self.reward_health.env_failed(ev):
                say(self.console, f"an environment failed ({ev['failure']}) in episode {ev['uid']}: {ev['error']}; "
                                  f"that episode is {'not trained' if self.cfg.env.failure_reward is None else 'scored env.failure_reward'}, "
                                  f"the run goes on (later ones are counted in env/failures)", "warning")
        elif kind == reports.FAILED:
            if self.closing.is_set():
                return self._failed(ev["role"], ev["replica"], ev.get("traceback"), "failed")
            return self._recover(ev["role"], ev["replica"], "failed", tb=ev.get("traceback"), failed=True)
        elif kind == reports.DONE:
            if (why := self._not_done(ev)) is not None:  # forged, or a confused actor: the run goes on
                self._bad_report(f"a 'done' report refused: {why}", ev)
                return None
            self.closing.set()
            self.trainer = {"replicas": ev["replicas"], "identical_weights": ev["identical_weights"]}
            if not ev["identical_weights"]:
                say(self.console, "the trainer replicas ended with different weights", style="red")
                return 1
            return self._done(ev["version"])
        return None

    def _curriculum(self, group_rewards: list) -> dict:
        """Add a step's group rewards to each prompt's history (data.curriculum); the step's curriculum metrics."""
        for gid, mean in group_rewards:
            prompt = self.feeder.prompt_of.pop(logical_group(str(gid)), None)
            if prompt is not None and isinstance(mean, (int, float)):
                seen = self.prompt_history.setdefault(prompt, [0, 0.0])
                seen[0], seen[1] = seen[0] + 1, seen[1] + float(mean)
        skipped, self.curriculum_logged = self.feeder.curriculum_skipped - self.curriculum_logged, \
            self.feeder.curriculum_skipped
        return {"curriculum/skipped": skipped, "curriculum/prompts_seen": len(self.prompt_history)}

    def _replace(self, ev: dict) -> None:
        """Have the feeder issue the replacements the actor asked for, once it is sure they can be right: the
        step is the one the actor fills (the next after the last reported), the count within its budget."""
        step, groups, cfg = ev["step"], ev["groups"], self.cfg
        budget = replica_budget(cfg) * cfg.actor.replicas
        asked = self.replacements_asked.get(step, 0) + groups
        # ahead by 1 (2 with several trainer ranks): a rank's report overtook rank 0's metrics of the steps before
        filling = 0 <= step - self.ledger.last_step <= (2 if cfg.actor.replicas > 1 else 1)
        if not cfg.data.filter_groups or not filling or step >= cfg.flow.steps or groups < 1 or asked > budget:
            self._bad_report(f"a 'replace' report refused (step {step}, {groups} groups; the actor has reported "
                             f"{self.ledger.last_step} steps, {self.replacements_asked.get(step, 0)} of {budget} "
                             f"replacements issued; data.filter_groups={cfg.data.filter_groups})", ev)
            return None
        self.replacements_asked[step] = asked
        self.feeder.replace(step, groups)
        return None

    def _not_done(self, ev: dict) -> str | None:
        """Why a ``done`` report cannot be true (None: it can): it must come after every step's metrics, for
        the run's last version, with the final checkpoint written (the actor reports only after that)."""
        steps = self.cfg.flow.steps
        if ev["version"] != steps or self.ledger.last_step != steps:
            return f"it says version {ev['version']}, the run has {steps} steps and metrics up to step " \
                   f"{self.ledger.last_step}"
        if not (Path(self.cfg.run_dir) / "checkpoints" / "final" / "config.json").is_file():
            return f"{self.cfg.run_dir}/checkpoints/final holds no model"
        return None

    def _bad_report(self, why: str, head) -> None:
        """A report refused (by the control socket, or here): the first few shown, every one counted."""
        self.refused_reports += 1
        if self.refused_reports <= SHOWN_REFUSALS:
            say(self.console, f"control socket: {why} ({str(head)[:80]})" + (
                "; later refusals are only counted (summary.json: control_refused)"
                if self.refused_reports == SHOWN_REFUSALS else ""), "warning")

    def _decoded(self, examples: list[dict], step: int) -> list[dict]:
        """The actor's sample of a step (token ids) as text, for samples.jsonl and the W&B table."""
        text = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [{"prompt": text(e["prompt_ids"]), "response": text(e["response_ids"]), "reward": e["reward"],
                 "version": e["version_start"], "staleness": step - 1 - e["version_start"]} for e in examples]

    def _done(self, version: int) -> int:
        """The actor finished every step: 0, unless no step had anything to train (a run that trained nothing).
        The last step's evaluation (eval.every) is waited for, bounded by flow.wait_seconds."""
        if self.evals is not None:
            for row in self.evals.finish(self.cfg.flow.wait_seconds):
                self.tracker.log_eval(row)
        idle = self.ledger.steps - self.ledger.updated  # steps without an update
        if idle and idle == self.ledger.steps:
            say(self.console, f"the run trained nothing: none of its {version} steps had a sample to train (every "
                              f"reward failed, or no group had two different rewards: see groups/skipped and "
                              f"reward/errors in {self.cfg.run_dir}/metrics.jsonl)", "error")
            return 1
        say(self.console, f"{version} steps" + (f" ({version - idle} updated the policy; {idle} had no sample to "
                                                f"train)" if idle else "")
            + f"; checkpoint in {self.cfg.run_dir}/checkpoints/final", "done")
        return 0

    def _failed(self, role: str, replica: int, tb: str | None, what: str, detail: str | None = None,
                title: str | None = None) -> int:
        self.closing.set()
        body = tb if tb is not None else "(no traceback: the process died without reporting; see its output above)"
        body = "\n".join(filter(None, [detail, body]))
        self.console.print(Panel(plain(body), title=plain(title or f"role {role}-{replica} {what}"), border_style="red"))
        return 1

    def _summary(self, wall: float) -> None:
        summary = {"wall_s": round(wall, 3), "model_path": self.model_path, "launcher": self.cfg.launcher,
                   "busy_s": dict(self.busy), "samples_by_replica": dict(self.work),
                   **self.reward_health.summary(),
                   "steps": {"done": self.ledger.steps, "updated": self.ledger.updated},
                   "samples": self.ledger.counts(self.feeder.issued_groups() if self.feeder is not None else set()), "trainer": self.trainer, "sync": self.sync.totals,
                   "supervision": {"restarts": self.supervisor.history, "lease_expiries": self.lease_expiries},
                   "control_refused": self.refused_reports,
                   **({"eval": self.evals.last} if self.evals is not None else {}),
                   "cores": machine_cores(),
                   "timeline": {"spans_dropped": self.timeline.spans_dropped if self.timeline else {}}}
        (Path(self.cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))

    # ------------------------------------------------------------------ shut down
    def _shutdown(self) -> None:
        self.closing.set()
        if self.evals is not None:
            self.evals.close()
        if self.feeder is not None:
            self.feeder.stop.set()
        if self.sampler is not None:
            self.sampler.close()
        if self.bus is not None:
            self.bus.close()
        if self.placement is not None:
            self.placement.stop(self.cfg.flow.shutdown_seconds, lambda m: say(self.console, m, style="yellow"))
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
        """Write run_dir/report (tracking.report), print the capacity advice, send the figures to W&B.

        An interrupted run gets the report of what it logged too; a second Ctrl-C skips it (every process
        is already stopped by then, so nothing is left behind either way)."""
        if not self.cfg.tracking.report or self.tracker is None or not self.ledger.steps:
            return
        from rlflow.flow.observe.report import report_at_end

        if self.interrupted:
            say(self.console, "writing the report of what the run logged (Ctrl-C again skips it)", style="yellow")
        try:
            report_at_end(self.cfg.run_dir, self.console, self.tracker, self.ledger.last_step)
        except KeyboardInterrupt:
            say(self.console, f"report skipped; `rlflow report {self.cfg.run_dir}` writes it", style="yellow")

    def _drain_spans(self) -> None:
        """Write the spans of the heartbeats that arrived after supervision ended (each role's last)."""
        while True:
            try:
                kind, ev = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "report" and ev["kind"] == reports.HEARTBEAT:
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
        from rlflow.flow.placement.ray_cluster import RayPlacement

        return RayPlacement(cfg, roles, sock_dir, log)
    from rlflow.flow.placement.local import LocalPlacement

    return LocalPlacement(sock_dir)
