"""The ``rlflow`` command.

    rlflow [key=value ...]                 train with the default recipe (recipes/default.yaml)
    rlflow -cn gsm8k_qwen key=value ...    train with another recipe
    rlflow --cfg job [overrides]           print the composed config and exit (Hydra)
    rlflow doctor [-cn NAME] [overrides]   check the installation and a recipe before a long run
    rlflow report RUN_DIR                  figures, timeline (trace.json) and capacity advice of a run
    rlflow bus serve|stats|keygen|demo     the transfer-queue bus on its own

Training is a Hydra app over the structured config in ``flow/config.py``: a misspelled key or a value of
the wrong type fails at compose time with Hydra's message; ``flow.config.validate`` then checks values.
Heavy imports (torch, transformers, wandb) happen after composition, so ``--help`` is quick.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bus"]:
        from transfer.cli import main as bus_main

        return bus_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from flow.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["report"]:
        from flow.report import main as report_main

        return report_main(argv[1:])
    return train(argv)


def train(argv: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    from flow.config import register

    register()
    # Like `python -m`, make the working directory importable, so reward.fn=my_module.fn and
    # rollout.engine=my_module.MyEngine find the user's own files (role processes inherit sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    status = {"code": 0}

    @hydra.main(config_path="pkg://recipes", config_name="default", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        from flow.config import ConfigError
        from flow.launcher import run
        from flow.tracking import make_console

        console = make_console()
        try:
            status["code"] = run(cfg, console)
        except ConfigError as e:  # a bad recipe value, named with its fix
            console.print(f"[red]error[/]: {e}")
            status["code"] = 2

    sys.argv = [sys.argv[0], *argv]  # Hydra reads its arguments from sys.argv
    _app()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
