"""``rlflow doctor [-cn RECIPE] [overrides]``: check an installation and a recipe before a long run.

Every check says what it found and, when something is wrong, what to do about it; nothing is started
and nothing is trained. The exit code is 1 when any check failed (warnings do not fail), so a job
script can run it first. Checks, in order: Python and packages (the extras the recipe needs), the
recipe's values (``RunConfig.check``), the model (config, tokenizer, weights), the data (file,
columns, the reward function's parameters), plug-in paths, devices, disk (checkpoints, /dev/shm for the
bus), sockets (the socket directory, this node's IP, a Ray cluster's address) and a resume point.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlflow.flow.observe.tracking import plain, say

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str


class Doctor:
    def __init__(self, cfg):
        self.cfg = cfg
        self.checks: list[Check] = []
        self.tokenizer = None  # the start checkpoint's, once the model check loaded it

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def run(self) -> list[Check]:
        for step in (self.python_and_packages, self.recipe, self.model, self.data, self.plugins, self.devices,
                     self.disk, self.sockets, self.resume):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - a check that crashes is itself a finding
                self.add(step.__name__, FAIL, f"the check itself failed: {type(e).__name__}: {e}")
        return self.checks

    # ------------------------------------------------------------------ checks
    def python_and_packages(self) -> None:
        v = sys.version_info
        self.add("python", OK if v >= (3, 11) else FAIL,
                 f"{v.major}.{v.minor}.{v.micro}" + ("" if v >= (3, 11) else ": rlflow needs Python >= 3.11"))
        cfg = self.cfg
        needed = {"torch": "", "transformers": "", "pyarrow": "", "zmq": "", "hydra": "", "safetensors": "",
                  "xxhash": ""}
        if cfg.tracking.wandb:
            needed["wandb"] = "or tracking.wandb=false"
        if cfg.launcher == "ray":
            needed["ray"] = "pip install 'rlflow[ray]'"
        if cfg.rollout.engine == "sglang":
            needed["sglang"] = "pip install 'rlflow[sglang]' on a GPU host"
        for module, fix in needed.items():
            try:
                m = importlib.import_module(module)
                self.add(f"package {module}", OK, getattr(m, "__version__", "installed"))
            except ImportError as e:
                self.add(f"package {module}", FAIL, f"not importable ({e}); install it{': ' + fix if fix else ''}")
        import zmq

        self.add("zmq CURVE", OK if zmq.has("curve") else FAIL,
                 f"libzmq {zmq.zmq_version()}" + ("" if zmq.has("curve") else ": built without CURVE; sockets beyond "
                                                  "this machine cannot be authenticated (install pyzmq's wheel)"))

    def recipe(self) -> None:
        from rlflow.flow.config import ConfigError

        try:
            self.cfg.check()
            self.add("recipe", OK, f"valid: launcher={self.cfg.launcher}, {self.cfg.flow.steps} steps, "
                                   f"staleness {self.cfg.flow.staleness}")
        except ConfigError as e:
            self.add("recipe", FAIL, str(e))

    def model(self) -> None:
        path = self.cfg.model.path
        if path is None:
            t = self.cfg.model.tiny
            self.add("model", OK, f"a tiny model ({t.num_layers} layers x {t.hidden_size}) built locally at the start")
            return
        p = Path(path)
        from rlflow.flow.config import checkpoint_problem

        problem = checkpoint_problem(path)
        if problem is not None:
            self.add("model", FAIL, f"model.path={path!r} {problem}")
            return
        from transformers import AutoConfig, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(path)
            self.add("model config", OK, f"{config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers")
        except Exception as e:  # noqa: BLE001
            self.add("model config", FAIL, f"config.json of {path} does not load: {e}")
        else:
            if self.cfg.actor.lora.enabled:
                self._lora(config)
        try:
            tok = self.tokenizer = AutoTokenizer.from_pretrained(path)
            chat = getattr(tok, "chat_template", None) is not None
            status = FAIL if self.cfg.data.chat_template and not chat else OK
            self.add("tokenizer", status, f"{type(tok).__name__}, vocab {len(tok)}" +
                     ("; data.chat_template=true but it has no chat template" if status == FAIL else ""))
        except Exception as e:  # noqa: BLE001
            self.add("tokenizer", FAIL, f"the tokenizer of {path} does not load: {e}")
        weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin"))
        size = sum(f.stat().st_size for f in weights)
        self.add("model weights", OK if weights else FAIL,
                 f"{len(weights)} files, {size / 2**30:.2f} GiB" if weights else f"no *.safetensors or *.bin in {path}")

    def _lora(self, config) -> None:
        """actor.lora's targets against the model, on its skeleton (the meta device: no weights read), so a
        target that is missing or tied to the embeddings fails here, not after the trainer's load."""
        import torch
        from transformers import AutoModelForCausalLM

        from rlflow.engines import lora

        cfg = self.cfg.actor.lora
        try:
            with torch.device("meta"):
                model = lora.wrap(AutoModelForCausalLM.from_config(config), cfg)
        except (ValueError, ImportError) as e:
            self.add("LoRA targets", FAIL, str(e))
            return
        adapters = sum(p.numel() for p in lora.policy(model).values())
        whole = sum(p.numel() for p in model.parameters())
        self.add("LoRA targets", OK, f"rank {cfg.rank} on {sorted(cfg.target_modules)}: {adapters:,} adapter parameters, "
                                     f"{adapters / whole:.2%} of {whole:,}")

    def data(self) -> None:
        d = self.cfg.data
        if d.path is None:
            self.add("data", OK, f"built-in task {d.task!r}")
            return
        from rlflow.flow.data import check_tokens, read_prompts

        try:
            prompts = read_prompts(d.path, d.prompt_key, d.split)
            if self.tokenizer is not None:
                check_tokens(self.tokenizer, prompts)
        except (OSError, ValueError) as e:  # ConfigError is a ValueError
            self.add("data", FAIL, str(e))
            return
        columns = sorted(prompts.records[0])
        self.add("data", OK, f"{len(prompts.records)} records; columns {columns}")
        if self.cfg.reward.fn:
            self._reward_parameters(self.cfg.reward.fn, set(columns))

    def _reward_parameters(self, fn_path: str, columns: set[str]) -> None:
        from rlflow.plugins import load_object

        try:
            fn = load_object(fn_path, "reward.fn")
        except ValueError as e:
            self.add("reward.fn", FAIL, str(e))
            return
        params = inspect.signature(fn).parameters.values()
        required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [n for n in required[1:] if n not in columns]  # the first parameter is the response
        self.add("reward.fn", FAIL if missing else OK,
                 f"needs columns {missing} the data does not have (it has {sorted(columns)})" if missing
                 else f"{fn_path}({', '.join(required)}) is satisfied by the data's columns")

    def plugins(self) -> None:
        from rlflow.plugins import load_object

        plugins = [("rollout.engine", self.cfg.rollout.engine), ("actor.engine", self.cfg.actor.engine)]
        if self.cfg.data.filter_groups:
            plugins.append(("data.filter_fn", self.cfg.data.filter_fn))
        for field, value in plugins:
            if value in ("hf", "sglang"):
                continue
            try:
                load_object(value, field)
                self.add(field, OK, f"{value} imports")
            except ValueError as e:
                self.add(field, FAIL, str(e))
        env = self.cfg.env
        if env.agent:  # loaded, and its signature bound to what each episode passes it
            try:
                fn = load_object(env.agent, "env.agent")
                inspect.signature(fn).bind({}, "http://127.0.0.1:1/v1", **env.kwargs)
                self.add("env.agent", OK, f"{env.agent}(record, base_url, **env.kwargs) can be called")
            except (ValueError, TypeError) as e:
                self.add("env.agent", FAIL, f"{env.agent}(record, base_url, **env.kwargs) cannot be called: {e}")
        elif env.enabled:  # built once here with its kwargs, as each episode builds it in an environment worker
            try:
                load_object(env.cls, "env.cls")(**env.kwargs)
                self.add("env.cls", OK, f"{env.cls}(**env.kwargs) builds")
            except Exception as e:  # noqa: BLE001 - user code: whatever it raises is the finding
                self.add("env.cls", FAIL, f"{env.cls}(**env.kwargs) does not build: {type(e).__name__}: {e}")

    def devices(self) -> None:
        import torch

        roles = ("rollout", "actor", "reference") if self.cfg.actor.kl_coef > 0 else ("rollout", "actor")
        wanted = [(n, getattr(self.cfg, n).device) for n in roles]
        cuda = [(n, dev) for n, dev in wanted if dev.startswith("cuda")]
        count = torch.cuda.device_count()
        if not cuda:
            self.add("devices", OK, f"every role on cpu ({os.cpu_count()} cores here)")
        elif self.cfg.launcher == "ray":
            self.add("devices", OK, f"GPUs come from the Ray cluster; this machine sees {count}")
        else:
            self.add("devices", OK if count else FAIL,
                     f"{count} GPU(s) visible" if count else f"{', '.join(f'{n}.device={d}' for n, d in cuda)} "
                     f"but torch sees no GPU here; use cpu or run on a GPU host")
            actor = self.cfg.actor
            if count and actor.device == "cuda" and actor.replicas > 1:  # rank r takes GPU r (nccl: one each)
                self.add("actor.replicas", OK if count >= actor.replicas else FAIL,
                         f"{actor.replicas} trainer ranks on GPUs 0..{actor.replicas - 1}" if count >= actor.replicas
                         else f"{actor.replicas} trainer ranks need a GPU each, this machine has {count}: lower "
                              f"actor.replicas or use launcher=ray")

    def disk(self) -> None:
        run_dir = Path(self.cfg.run_dir)
        probe = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        model_bytes = self._model_bytes()
        # a checkpoint holds fp32 weights and two fp32 Adam moments; `keep` of them plus `final` and one being written
        need = 3 * 4 * model_bytes / 2 * (self.cfg.actor.checkpoint_keep + 2) if model_bytes else 0
        ok = free >= need
        self.add("disk (run_dir)", OK if ok else FAIL,
                 f"{free / 2**30:.1f} GiB free at {probe}" + (f"; checkpoints need about {need / 2**30:.1f} GiB"
                                                              if need else "") +
                 ("" if ok else ": free space, or lower actor.checkpoint_keep"))
        if os.path.isdir("/dev/shm"):
            shm_free = shutil.disk_usage("/dev/shm").free
            cap = self.cfg.flow.bus_capacity_bytes
            self.add("/dev/shm", OK if shm_free >= cap else WARN,
                     f"{shm_free / 2**30:.1f} GiB free; the bus may hold up to flow.bus_capacity_bytes="
                     f"{cap / 2**30:.1f} GiB there" + ("" if shm_free >= cap else ": lower flow.bus_capacity_bytes "
                                                       "or enlarge /dev/shm (docker: --shm-size)"))

    def _model_bytes(self) -> int:
        """Bytes of the start policy's weights as stored (0 when unknown: the tiny model is a few MB)."""
        if self.cfg.model.path is None or not os.path.isdir(self.cfg.model.path):
            return 0
        p = Path(self.cfg.model.path)
        return sum(f.stat().st_size for f in list(p.glob("*.safetensors")) + list(p.glob("*.bin")))

    def sockets(self) -> None:
        tmp = tempfile.gettempdir()
        probe = os.path.join(tmp, "rlflow-XXXXXXXX", "weights-00.endpoint")
        writable = os.access(tmp, os.W_OK)
        self.add("socket dir", OK if writable and len(probe) < 100 else FAIL,
                 f"{tmp}" + ("" if writable else " is not writable") +
                 ("" if len(probe) < 100 else f": ipc paths there are too long ({len(probe)} chars); set TMPDIR "
                                              f"to a short path"))
        if self.cfg.launcher != "ray":
            return
        try:
            with socket.socket() as s:
                s.bind((_node_ip(), 0))
            self.add("node IP", OK, f"{_node_ip()}: roles listen here (CURVE-authenticated)")
        except OSError as e:
            self.add("node IP", FAIL, f"cannot listen on {_node_ip()}: {e}")
        address = self.cfg.ray.address
        if address and ":" in address and not address.startswith("ray://"):
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                self.add("ray.address", OK, f"{address} accepts connections")
            except (OSError, ValueError) as e:
                self.add("ray.address", FAIL, f"{address} does not accept connections ({e}): is the cluster up?")

    def resume(self) -> None:
        if self.cfg.resume is None:
            return
        from rlflow.flow.config import ConfigError
        from rlflow.flow.resume import requested_point

        try:
            point = requested_point(self.cfg)
            if point is not None:
                self.add("resume", OK, f"continues from {point.path} at step {point.version}")
        except ConfigError as e:
            self.add("resume", FAIL, str(e))


def _node_ip() -> str:
    """This machine's address as other nodes would reach it (the route to a public address; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def main(argv: list[str], console: Console | None = None) -> int:
    """Compose the recipe as ``rlflow`` would (``-cn NAME`` and overrides), run every check, print them
    (``--json``: also one JSON list of the checks as the last line)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rlflow.flow.config import ConfigError, check_recipe, register
    from rlflow.flow.overrides import parse, unknown
    from rlflow.flow.resume import locate, resume_settings, resuming

    console = console or Console()
    as_json = "--json" in argv
    name, overrides = "default", [a for a in argv if a != "--json"]
    if overrides[:1] in (["-cn"], ["--config-name"]):
        name, overrides = overrides[1], overrides[2:]
    register()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `rlflow` does: plug-ins may live in the working directory
    try:
        check_recipe(name)
    except ConfigError as e:
        say(console, str(e), "error")
        return 1
    bad = unknown(parse(overrides))
    first = [Check(f"setting {o.key}", FAIL, message) for o, message in bad]
    overrides = [a for a in overrides if a not in {o.text for o, _ in bad}]  # the other checks go on without them
    with initialize_config_module("rlflow.recipes", version_base="1.3"):
        dcfg = compose(name, overrides=overrides)
    if resuming(dcfg.resume):  # with the run's own settings, as `rlflow` would resume it
        try:
            locate(dcfg.resume, dcfg.run_dir)
        except ConfigError:
            pass  # the `resume` check reports a missing checkpoint
        else:
            try:
                dcfg, _ = resume_settings(dcfg, overrides)
            except ConfigError as e:
                first.append(Check("resume settings", FAIL, str(e)))
    cfg = OmegaConf.to_object(dcfg)
    checks = first + Doctor(cfg).run()
    table = Table(title=plain(f"rlflow doctor: recipe {name}" + (f" {' '.join(argv)}" if argv else "")))
    for col in ("check", "", "found / fix"):
        table.add_column(col, overflow="fold")
    colors = {OK: "green", WARN: "yellow", FAIL: "red"}
    for c in checks:
        table.add_row(plain(c.name), plain(c.status, colors[c.status]), plain(c.detail))
    console.print(table)
    failed = [c.name for c in checks if c.status == FAIL]
    say(console, f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "ready to run",
        style="red" if failed else "green")
    if as_json:
        print(json.dumps([c.__dict__ for c in checks]))
    return 1 if failed else 0
