"""The ``rlflow`` command (``rlflow --help`` prints ``HELP``).

Training is a Hydra app over the structured config in ``flow/config.py``. Before Hydra composes
anything, every ``key=value`` is checked against the settings (``flow/overrides.py``: a typo is refused
with the nearest key, also when added with ``+``) and ``-cn`` against the recipes; ``RunConfig.check``
then checks values. Heavy imports (torch, transformers, wandb) happen after composition, so ``--help``
and a mistyped key answer at once.

Hydra's files are rlflow's business, so the command sets them (``HYDRA_SETTINGS``): no log file and no
``.hydra/`` directory (a run writes its own ``config.yaml``), and nothing is created before the run
decides to start, so a refused run leaves no directory behind. A sweep (``rlflow -m k=a,b ...``) runs
its jobs one after the other, each in a directory of its own under the recipe's ``run_dir``:
``RUN_DIR/<job number>_<key>:<value>_...`` (its swept values); a job that fails does not stop the
others, the sweep's summary lists them all, and its exit code is the worst of its jobs'. Ctrl-C stops
the sweep.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from pathlib import Path

HELP = """\
rlflow: asynchronous streaming RL post-training of LLMs (rollout, reward, reference and actor roles
exchanging Arrow batches over a ZeroMQ bus; one staleness knob from on-policy to fully async).

  rlflow [-cn RECIPE] [key=value ...]      train (default recipe: a tiny model built here, the built-in
                                           `reverse` task, on CPU, learning within minutes)
  rlflow -m key=a,b [key=value ...]        a sweep: one run per combination, each in RUN_DIR/<job>_<key>:<value>
  rlflow --cfg job [key=value ...]         print every setting as the run would see it, and exit
  rlflow doctor [-cn RECIPE] [key=value]   check the installation and a recipe before a long run
  rlflow report RUN_DIR                    figures, trace.json and capacity advice of a run (going or done)
  rlflow export CHECKPOINT OUT_DIR         a sharded (actor.parallel=fsdp) or LoRA checkpoint as a from_pretrained directory
  rlflow eval CHECKPOINT [--samples N ...] pass@1, pass@k and mean reward on held-out prompts, with 95% intervals
  rlflow bus stats RUN_DIR|ADDRESS         what a run's bus holds now: rows, consumers, leases, waits
  rlflow bus serve|keygen|demo             the transfer-queue bus on its own

Recipes (-cn NAME): {recipes}

Most used settings (every one with its default: rlflow --cfg job):
  run_dir=runs/NAME          flow.steps=300              flow.staleness=1 (0: on-policy, null: fully async)
  data.task=reverse|sort|add data.path=FILE.jsonl|.parquet data.prompt_key=prompt    reward.fn=pkg.module.fn
  model.path=CHECKPOINT_DIR  rollout.group_size=8        actor.groups_per_step=16    actor.lr=3e-4
  rollout.replicas=N         reward.replicas=N           launcher=local|ray          tracking.wandb=false
  actor.replicas=N           actor.parallel=fsdp         actor.lora.rank=16 (LoRA adapters: rank 0 trains all)
  resume=true                continue run_dir from its newest checkpoint, with the run's own settings

Where to change what: README.md (its first screen maps the code). Hydra's own flags: rlflow --hydra-help
"""

HYDRA_SETTINGS = ["hydra/job_logging=none", "hydra.output_subdir=null", "hydra.job.chdir=false", "hydra.run.dir=.",
                  "hydra.sweep.dir=${run_dir}", "hydra.sweep.subdir=${rlflow_job:}"]
"""Hydra settings every rlflow command line gets first (the user's own come after and win)."""


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C before anything was started (importing, composing): no traceback
        print("interrupted", file=sys.stderr)
        return 130


def _interrupt(signum, frame) -> None:
    """SIGTERM (what a scheduler, `kill` or a container stop sends) stops a run as Ctrl-C does: every role
    stopped, the report of what was logged written, exit code 130. Without it the launcher would die at
    once and leave its roles to notice its death, with nothing written."""
    raise KeyboardInterrupt


def _dispatch(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        from rlflow import recipes

        print(HELP.format(recipes=", ".join(recipes.names())), end="")
        return 0
    if argv[:1] == ["bus"]:
        from rlflow.transfer.cli import main as bus_main

        return bus_main(_bus_args(argv[1:]))
    if argv[:1] == ["doctor"]:
        from rlflow.flow.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["report"]:
        from rlflow.flow.observe.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["export"]:
        return export(argv[1:])
    if argv[:1] == ["eval"]:
        from rlflow.flow.evaluate import main as eval_main

        return eval_main(argv[1:])
    return train(argv)


def export(argv: list[str]) -> int:
    """``rlflow export CHECKPOINT OUT_DIR``: a sharded or LoRA checkpoint's policy as a ``from_pretrained``
    directory (LoRA: the adapters merged into the base)."""
    import argparse

    from rlflow.flow.observe.tracking import make_console, say

    parser = argparse.ArgumentParser(prog="rlflow export", description=export.__doc__.split(": ", 1)[1])
    parser.add_argument("checkpoint", help="a checkpoint directory with dcp/ or adapter/ (e.g. RUN_DIR/checkpoints/step-40)")
    parser.add_argument("out", help="the directory to write (new, or empty)")
    parser.add_argument("--base", default=None,
                        help="LoRA: the base model directory, when the one the adapter config names has moved")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="what the weights are saved in (merged in float32 first; default float32)")
    args = parser.parse_args(argv)
    console = make_console()
    if not Path(args.checkpoint).is_dir():
        say(console, f"{args.checkpoint}: no such checkpoint directory", "error")
        return 2
    from rlflow.train.checkpoint import export as export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, args.base, args.dtype)
    except ValueError as e:
        say(console, str(e), "error")
        return 2
    say(console, f"exported {args.checkpoint} to {args.out} (from_pretrained reads it)")
    return 0


def train(argv: list[str]) -> int:
    import hydra
    from hydra._internal.utils import get_args_parser
    from omegaconf import DictConfig, OmegaConf

    from rlflow.flow.config import ConfigError, check_recipe, register
    from rlflow.flow.overrides import check_keys, check_recipe_file, parse
    from rlflow.flow.observe.tracking import make_console, say

    console = make_console()
    args = get_args_parser().parse_intermixed_args(argv)  # flags may come after overrides (`rlflow k=v -m`)
    if not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        # The roles' forkserver imports torch and transformers (2-3 s of CPU): started first, that overlaps
        # everything the launcher does before its first role starts. A run that turns out to be
        # launcher=ray stops it (flow/launcher.run); any exit before that does (an exit hook).
        from rlflow.flow.placement.local import start_forkserver

        start_forkserver()
    overrides = parse(args.overrides)
    try:
        if args.config_name and not (args.config_path or args.config_dir):
            check_recipe(args.config_name)
        elif args.config_name and args.config_dir:
            check_recipe_file(os.path.join(args.config_dir, args.config_name.removesuffix(".yaml") + ".yaml"))
        check_keys(overrides)
    except ConfigError as e:
        say(console, str(e), "error")
        return 2
    register()
    swept = [o.key for o in overrides if o.sweep]
    OmegaConf.register_new_resolver("rlflow_job", lambda: _job_dir_name(swept), replace=True)
    # Like `python -m`, make the working directory importable, so reward.fn=my_module.fn and
    # rollout.engine=my_module.MyEngine find the user's own files (role processes inherit sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    jobs: list[dict] = []

    @hydra.main(config_path="pkg://rlflow.recipes", config_name="default", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        jobs.append(_job(cfg, console, swept))
        if jobs[-1]["code"] == 130:  # Ctrl-C ends a sweep too, not only its job
            raise KeyboardInterrupt

    # Hydra reads sys.argv with every override in one run: ours, then the user's (which win), then the
    # flags (last, so that one taking an optional value, `--info`, takes nothing of ours)
    flags = list(argv)
    for o in args.overrides:
        flags.remove(o)
    sys.argv = [sys.argv[0], *HYDRA_SETTINGS, *args.overrides, *flags]
    try:
        _app()
    except KeyboardInterrupt:
        if not jobs or jobs[-1]["code"] != 130:  # before a run had started (building the model, say)
            say(console, "interrupted", style="yellow")
            jobs.append({"overrides": [], "code": 130})
    if args.multirun:
        _sweep_summary(console, jobs)
    return max((j["code"] for j in jobs), default=0)


def _job(cfg, console, swept: list[str]) -> dict:
    """One run of a command line (or one job of a sweep, in a directory of its own)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlflow.flow.config import ConfigError
    from rlflow.flow.launcher import run
    from rlflow.flow.resume import resuming
    from rlflow.flow.observe.tracking import say

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job = {"overrides": _swept_values(overrides, swept), "code": 0}
    try:
        if hc.mode == RunMode.MULTIRUN:
            if resuming(cfg.resume):
                raise ConfigError("resume: a sweep starts a new run per job; resume its runs one at a time")
            cfg.run_dir = os.path.relpath(hc.runtime.output_dir)
            if cfg.tracking.name is None:  # W&B: the sweep's name and the job's, not the job's alone
                cfg.tracking.name = os.path.join(*Path(cfg.run_dir).parts[-2:])
            say(console, f"sweep job {hc.job.num}: {' '.join(job['overrides']) or '(no swept value)'} -> {cfg.run_dir}",
                style="bold")
        job["run_dir"] = cfg.run_dir
        job["code"] = run(cfg, console, overrides)
    except ConfigError as e:  # a bad recipe value, named with its fix
        say(console, str(e), "error")
        job["code"] = 2
    except Exception:  # noqa: BLE001 - a sweep's other jobs still run, and its summary says which failed
        say(console, traceback.format_exc(), "error")
        job["code"] = 1
    if hc.mode == RunMode.MULTIRUN and job["code"] == 2:
        _remove_if_empty(Path(hc.runtime.output_dir))  # Hydra made it; a refused job leaves nothing
    return job


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (the run wrote something), or gone
        pass


def _job_dir_name(swept: list[str]) -> str:
    """A sweep job's directory name: its number and its swept values, ``3_flow.staleness:2_actor.lr:0.001``.

    Only characters a command line can give back unquoted (``run_dir=...`` of a resume, say): no ``=``
    or ``,`` (Hydra's grammar), no ``/``."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    values = [o.lstrip("+~").replace("=", ":", 1) for o in _swept_values(hc.overrides.task, swept)]
    return re.sub(r"[^\w.:+@%-]", "-", "_".join([str(hc.job.num), *values]))[:120]


def _swept_values(overrides, swept: list[str]) -> list[str]:
    """The overrides of a sweep's job (``key=value``) whose key the sweep varies."""
    return [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]


def _sweep_summary(console, jobs: list[dict]) -> None:
    from rich.table import Table

    from rlflow.flow.observe.tracking import plain

    table = Table("job", "swept values", "run directory", "result", title=plain("sweep"))
    for i, j in enumerate(jobs):
        result = {0: "done", 2: "refused (settings)", 130: "interrupted"}.get(j["code"], f"failed (exit {j['code']})")
        table.add_row(str(i), plain(" ".join(j["overrides"])), plain(j.get("run_dir", "-")),
                      plain(result, "green" if j["code"] == 0 else "red"))
    console.print(table)


def _bus_args(argv: list[str]) -> list[str]:
    """``rlflow bus stats RUN_DIR``: a run directory stands for its bus (address and keys, from processes.json)."""
    if argv[:1] != ["stats"] or len(argv) < 2 or not os.path.isdir(argv[1]):
        return argv
    import json

    path = os.path.join(argv[1], "processes.json")
    try:
        procs = json.loads(open(path).read())
        address, keys, launcher = procs["bus_address"], procs.get("keys_dir"), procs["launcher"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {argv[1]} is not a started run's directory ({path}: {e})") from None
    try:
        os.kill(launcher, 0)
    except ProcessLookupError:
        raise SystemExit(f"error: the run in {argv[1]} is not running (its launcher, pid {launcher}, is gone), and "
                         f"its bus went with it; `rlflow report {argv[1]}` shows what it did") from None
    except PermissionError:
        pass
    return ["stats", address, *(["--keys-dir", keys] if keys else []), *argv[2:]]


if __name__ == "__main__":
    sys.exit(main())
