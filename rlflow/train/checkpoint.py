"""Trainer checkpoints: a snapshot in memory at the step, written to disk on a thread of its own.

    checkpoints/step-N/            (written as step-N.tmp, then renamed: a step-N directory is always whole)
        config.json, model.safetensors, tokenizer files    the policy: ``from_pretrained(path)`` loads it
        optimizer.pt                                       optimizer state (the engine's ``snapshot``)
        rng.pt                                             the trainer's torch RNG states
        trainer_state.json                                 version, epoch, the groups each step consumed and
                                                           the uids it skipped, the RNG file's name
    checkpoints/final/             the same, when the run ends

A sharded trainer (``actor.parallel=fsdp``) writes its checkpoints as every rank's own rows instead:

    checkpoints/step-N/dcp/        model and AdamW state, a .distcp file per rank and .metadata (PyTorch
                                   Distributed Checkpoint: loads on any number of ranks, or unsharded)
    checkpoints/step-N/config.json, tokenizer files, rng.pt, trainer_state.json   as above
    checkpoints/final/             the same, plus the whole model (``from_pretrained``), gathered at the end

The ranks stage their rows in memory and write them to ``<name>.dcp`` beside the checkpoints while
training goes on; rank 0's write moves them into ``<name>.tmp/dcp`` once every rank's are on disk.
``rlflow export`` makes a ``from_pretrained`` directory of any sharded checkpoint (``export``).

A LoRA trainer (``actor.lora``) writes the adapters alone, sharded or not (they are small):

    checkpoints/step-N/adapter/    adapter_config.json, adapter_model.safetensors (peft's files; the config
                                   names the run's start model as the base)
    checkpoints/step-N/optimizer.pt    the adapters' optimizer state, keyed by name
    checkpoints/step-N/config.json, tokenizer files, rng.pt, trainer_state.json   as above (the base's config)
    checkpoints/final/             the same; with ``actor.lora.final=merged`` also ``merged/``: the base
                                   with the adapters merged in (``from_pretrained``), made once the
                                   checkpoint is whole. ``rlflow export`` merges any of them.

What a resume needs beyond the engine: the policy version N, and which prompt groups steps 1..N
consumed (the data position: ``groups_by_step``). Nothing else on the bus is worth keeping: rows not
yet trained are regenerated (those a discarded policy produced must be), so on resume the flow clears
the bus and reissues every group no kept step consumed. ``epoch`` counts rewinds: rows issued after a
rewind carry it in their uid (``flow/feeder.py``), so nothing produced before the rewind can land on them.

Stall: the step waits only for the snapshot (copies of the weights and optimizer state in host memory)
and, if the previous checkpoint is still being written, for that write: at most one write is in flight,
so a slow disk costs steps time rather than unbounded memory. A write that fails is raised by the next
``save`` or by ``close``; the directory it was writing is removed.

torch is imported only where tensors are saved or loaded, so reading where a run stands (``latest``,
``read_state``: what the launcher does to resume) needs no torch.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

STATE = "trainer_state.json"
FINAL = "final"
STEP = re.compile(r"step-\d+")  # a complete step checkpoint's name
SHARDED = "dcp"  # a sharded checkpoint's directory of every rank's rows
ADAPTER = "adapter"  # a LoRA checkpoint's directory of adapters (peft's files)
STAGING = ".dcp"  # suffix of the directory the ranks write a sharded checkpoint to before rank 0 moves it in


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``: the highest version, ``final`` first among equals, or None.

    By version, not by name: a run resumed to train further writes ``step-N`` past its old ``final`` (the
    new ``final`` comes at its end), and a rewind or a resume meanwhile must go to the newest of them."""
    root = Path(root)
    found = [p for p in [root / FINAL, *root.glob("step-*")]
             if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).exists()]
    return max(found, key=lambda p: (_version(p), p.name == FINAL), default=None)


def _version(path: Path) -> int:
    """A checkpoint's version, -1 when its state cannot be read (it is then never the newest)."""
    try:
        return int(read_state(path)["version"])
    except (ValueError, KeyError, TypeError, OSError):
        return -1


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint holds sharded state (``dcp/``): its weights are there, not in ``from_pretrained`` files."""
    return (Path(path) / SHARDED).is_dir()


def is_adapter(path: str | Path) -> bool:
    """Whether a checkpoint is a LoRA run's (``adapter/``): its policy is the start model plus those adapters."""
    return (Path(path) / ADAPTER).is_dir()


def holds_model(path: str | Path) -> bool:
    """Whether a trainer resumes by building its model from the checkpoint itself: not when the weights
    are every rank's rows (``dcp/``) or adapters on the start model (``adapter/``), which ``restore`` loads."""
    return not is_sharded(path) and not is_adapter(path)


def lora_base(checkpoint: str | Path, base: str | Path | None = None) -> str:
    """The base model of a LoRA checkpoint: ``base``, else the one its adapter config names; a ValueError
    when that is not a model directory here."""
    from rlflow.engines.lora import adapter_base

    base = base or adapter_base(Path(checkpoint) / ADAPTER)
    if base is None or not (Path(base) / "config.json").is_file():
        raise ValueError(f"{checkpoint} holds LoRA adapters for the base model {base}, which is not a model "
                         f"directory here: give the base with --base PATH")
    return str(base)


def export(checkpoint: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "float32") -> None:
    """Write the policy of a sharded or a LoRA checkpoint to ``out`` as ``from_pretrained`` reads it
    (config, weights, tokenizer), in one process on the host, in ``dtype`` (the trainer's float32, or
    rounded to bfloat16/float16). A LoRA checkpoint's adapters are merged into its base (in float32):
    the model its adapter config names, or ``base``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    checkpoint, out = Path(checkpoint), Path(out)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    if not is_sharded(checkpoint) and not is_adapter(checkpoint):
        raise ValueError(f"{checkpoint} has no {SHARDED}/ nor {ADAPTER}/: it is not the checkpoint of a sharded "
                         f"(actor.parallel=fsdp) or a LoRA (actor.lora) trainer, and already loads with from_pretrained")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: export into a new directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_adapter(checkpoint):
        from rlflow.engines.lora import export_merged

        export_merged(checkpoint / ADAPTER, lora_base(checkpoint, base), tmp, getattr(torch, dtype))
    else:
        from rlflow.engines.fsdp import load_sharded

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            load_sharded(model, None, str(checkpoint / SHARDED))
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp)  # every checkpoint holds the run's tokenizer
    try:
        GenerationConfig.from_pretrained(checkpoint).save_pretrained(tmp)
    except OSError:  # no generation_config.json: nothing to carry over
        pass
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def read_state(path: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint directory; a ValueError says what is missing."""
    f = Path(path) / STATE
    if not f.exists():
        raise ValueError(f"{path} is not an rlflow checkpoint: it has no {STATE} (a model-only directory can be "
                         f"a run's start policy, model.path=DIR, but not resumed)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not readable JSON ({e}): the checkpoint is damaged; use another one") from None


class Checkpointer:
    """Writes checkpoints of one trainer under ``root``; keeps the newest ``keep`` step-N directories."""

    def __init__(self, root: str | Path, keep: int):
        self.root, self.keep = Path(root), keep
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"*{STAGING}"):  # a sharded write a crash left unfinished
            shutil.rmtree(stale, ignore_errors=True)
        # One write in flight and none queued: the bound that keeps a slow disk from piling up snapshots.
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.idle = threading.Event()
        self.idle.set()
        self.error: BaseException | None = None
        self.last_write_s = 0.0
        self.thread = threading.Thread(target=self._work, name="rlflow-checkpoint", daemon=True)
        self.thread.start()

    def save(self, name: str, write: Callable[[str], None], state: dict, timeout: float) -> dict[str, float]:
        """Queue ``write`` (the engine's snapshot writer) plus ``state`` as checkpoint ``name``; returns
        ``checkpoint/*`` metrics. Waits up to ``timeout`` for the previous write to finish first."""
        t0 = time.monotonic()
        if not self.idle.wait(timeout):
            raise TimeoutError(f"the previous checkpoint was still being written after {timeout:.0f}s "
                               f"(to {self.root}): is the disk full or stalled?")
        self._raise()
        waited = time.monotonic() - t0
        self.idle.clear()
        self.jobs.put((name, write, {**state, "rng": "rng.pt"}, _rng_states()))
        return {"checkpoint/wait_s": waited, "checkpoint/last_write_s": self.last_write_s}

    def close(self, timeout: float) -> None:
        """Wait (bounded) for the write in flight; raise its error if it failed."""
        if not self.idle.wait(timeout):
            raise TimeoutError(f"a checkpoint was still being written to {self.root} after {timeout:.0f}s")
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"writing a checkpoint under {self.root} failed: {error}") from error

    def _work(self) -> None:
        while True:
            name, write, state, rng = self.jobs.get()
            t0 = time.monotonic()
            final, tmp = self.root / name, self.root / f"{name}.tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                write(str(tmp))
                import torch

                torch.save(rng, tmp / state["rng"])
                (tmp / STATE).write_text(json.dumps(state))
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                self._prune()
            except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread by _raise
                shutil.rmtree(tmp, ignore_errors=True)
                self.error = e
            self.last_write_s = time.monotonic() - t0
            self.idle.set()

    def _prune(self) -> None:
        steps = sorted((p for p in self.root.glob("step-*") if p.is_dir() and STEP.fullmatch(p.name)),
                       key=lambda p: int(p.name.split("-", 1)[1]))  # not step-N.tmp, nor a sharded step-N.dcp
        for old in steps[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def _rng_states() -> dict:
    import torch

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(path: str | Path) -> None:
    import torch

    states = torch.load(Path(path) / "rng.pt", weights_only=True)  # tensors only: a crafted file runs no code
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
