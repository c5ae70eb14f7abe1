"""Trainer checkpoints: snapshot semantics, background writes, failure reporting, pruning, resume state."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from rlflow.train.checkpoint import Checkpointer, latest, read_state, restore_rng
from rlflow.engines.hf import HFTrainEngine
from conftest import SAMPLING
from test_engines import ACTOR, _prompts


def _train_step(engine: HFTrainEngine, prompts) -> None:
    logp = engine.token_logprobs(prompts, [[5, 6, 7]] * len(prompts))
    (-logp.sum()).backward()
    engine.step(1.0 / len(prompts))


def test_a_checkpoint_holds_the_snapshot_not_the_weights_trained_while_it_was_written(tiny_model, tmp_path):
    engine, prompts = HFTrainEngine(tiny_model, ACTOR, SAMPLING), _prompts(tiny_model, 4)
    _train_step(engine, prompts)
    at_snapshot = {k: v.clone() for k, v in engine.model.state_dict().items()}
    release, writing = threading.Event(), threading.Event()
    write = engine.snapshot()

    def slow_write(path: str) -> None:  # a slow disk: the write runs while training goes on
        writing.set()
        release.wait(30)
        write(path)

    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    ckpt.save("step-1", slow_write, {"version": 1, "epoch": 0, "groups_by_step": [["g0"]]}, timeout=5)
    assert writing.wait(10)  # save returned while the write is still blocked
    _train_step(engine, prompts)  # training goes on and changes the live weights
    with pytest.raises(TimeoutError, match="still being written"):
        ckpt.save("step-2", engine.snapshot(), {"version": 2}, timeout=0.2)  # one write in flight at most
    assert not (tmp_path / "checkpoints" / "step-1").exists()  # only a whole checkpoint gets its name
    release.set()
    ckpt.close(timeout=30)
    path = latest(tmp_path / "checkpoints")
    assert path.name == "step-1" and read_state(path)["groups_by_step"] == [["g0"]]
    saved = load_file(str(path / "model.safetensors"))
    for name, value in saved.items():
        assert torch.equal(value, at_snapshot[name]), name
    assert any(not torch.equal(engine.model.state_dict()[k], at_snapshot[k]) for k in saved)


def test_a_checkpoint_resumes_the_optimizer_and_the_version_bit_for_bit(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    engine, prompts = HFTrainEngine(tiny_model, ACTOR, SAMPLING), _prompts(tiny_model, 4)
    for _ in range(2):
        _train_step(engine, prompts)
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save("step-2", engine.snapshot(), {"version": engine.version, "epoch": 0, "groups_by_step": []}, timeout=5)
    ckpt.close(timeout=60)
    AutoModelForCausalLM.from_pretrained(tmp_path / "step-2")  # a plain Hugging Face checkpoint
    resumed = HFTrainEngine(str(tmp_path / "step-2"), ACTOR, SAMPLING)
    resumed.restore(str(tmp_path / "step-2"), read_state(tmp_path / "step-2")["version"])
    restore_rng(tmp_path / "step-2")
    assert resumed.version == 2
    _train_step(engine, prompts)
    _train_step(resumed, prompts)  # the same step from the restored state: Adam moments included
    for (name, a), b in zip(engine.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_failed_write_is_raised_by_the_next_save_and_leaves_no_partial_directory(tmp_path):
    def broken(path: str) -> None:
        (tmp_path / "checkpoints" / "step-1.tmp" / "half").write_text("x")
        raise OSError("No space left on device")

    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    ckpt.save("step-1", broken, {"version": 1}, timeout=5)
    with pytest.raises(RuntimeError, match="No space left on device"):
        ckpt.save("step-2", lambda path: None, {"version": 2}, timeout=5)
    assert not (tmp_path / "checkpoints" / "step-1.tmp").exists() and latest(tmp_path / "checkpoints") is None


def test_only_the_newest_checkpoints_are_kept_and_final_counts_as_newest_among_equals(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for v in (5, 10, 15):
        ckpt.save(f"step-{v}", lambda path: None, {"version": v}, timeout=5)
    ckpt.close(timeout=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-15"]
    assert latest(tmp_path).name == "step-15"
    ckpt.save("final", lambda path: None, {"version": 20}, timeout=5)
    ckpt.close(timeout=10)
    assert latest(tmp_path).name == "final" and json.loads((tmp_path / "final" / "trainer_state.json").read_text())["version"] == 20


def test_a_directory_without_trainer_state_is_refused_naming_what_it_lacks(tiny_model):
    with pytest.raises(ValueError, match="no trainer_state.json"):
        read_state(tiny_model)


def _checkpoints(run_dir, versions: dict[str, int]) -> None:
    """Checkpoint directories as a trainer leaves them (their state file; weights do not matter here)."""
    for name, version in versions.items():
        (run_dir / "checkpoints" / name).mkdir(parents=True)
        state = {"version": version, "epoch": 0, "groups_by_step": [[f"g{s}"] for s in range(version)]}
        (run_dir / "checkpoints" / name / "trainer_state.json").write_text(json.dumps(state))


def test_the_newest_checkpoint_is_the_highest_version_even_past_an_older_final(tmp_path):
    # a run that ended at step 4 (final) and was resumed to train further has written step-6 since
    _checkpoints(tmp_path, {"step-2": 2, "final": 4, "step-6": 6})
    assert latest(tmp_path / "checkpoints").name == "step-6"


def test_a_resume_continues_a_run_only_from_its_newest_checkpoint_and_never_into_another_run(tmp_path):
    from types import SimpleNamespace

    from rlflow.flow.config import ConfigError
    from rlflow.flow.resume import requested_point

    run, other = tmp_path / "run", tmp_path / "other"
    _checkpoints(run, {"step-2": 2, "step-4": 4})
    cfg = lambda resume, run_dir: SimpleNamespace(resume=str(resume), run_dir=str(run_dir),  # noqa: E731
                                                  flow=SimpleNamespace(steps=10), actor=SimpleNamespace(groups_per_step=1))
    assert requested_point(cfg("true", run)).version == 4
    with pytest.raises(ConfigError, match="has a newer checkpoint \\(step-4, step 4\\) than this one \\(step 2\\)"):
        requested_point(cfg(run / "checkpoints" / "step-2", run))
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="holds another run"):
        requested_point(cfg(run / "checkpoints" / "step-2", other))
    assert requested_point(cfg(run / "checkpoints" / "step-2", tmp_path / "branch")).version == 2  # a new directory


class _Payload:
    """What a crafted checkpoint file unpickles into when it is loaded with a full unpickler: a command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_rng_or_optimizer_file_is_refused_and_runs_no_code(tiny_model, tmp_path):
    from rlflow.train.checkpoint import restore_rng

    marker = tmp_path / "pwned"
    torch.save({"torch": _Payload(str(marker))}, tmp_path / "rng.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        restore_rng(tmp_path)
    engine = HFTrainEngine(tiny_model, ACTOR, SAMPLING)
    torch.save(_Payload(str(marker)), tmp_path / "optimizer.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.restore(str(tmp_path), 3)
    assert not marker.exists()


def test_pruning_counts_complete_step_checkpoints_only_and_clears_a_crashed_sharded_write(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-3.dcp").mkdir(parents=True)  # a sharded write a crash left: removed when a Checkpointer starts
    ckpt = Checkpointer(root, keep=1)
    assert not (root / "step-3.dcp").exists()
    for version in (2, 4):
        (root / f"step-{version + 1}.dcp").mkdir(exist_ok=True)  # the ranks staging the next one meanwhile
        ckpt.save(f"step-{version}", lambda path: None, {"version": version, "epoch": 0, "groups_by_step": []}, 10)
        ckpt.close(10)
    assert sorted(p.name for p in root.iterdir()) == ["step-3.dcp", "step-4", "step-5.dcp"]


def test_an_optimizer_that_never_stepped_is_saved_empty_and_restored_without_a_step(tiny_model, tmp_path):
    """Asking torch for the state of a fresh optimizer would take a step at lr 0 (AdamW's count then 1)."""
    engine = HFTrainEngine(tiny_model, ACTOR, SAMPLING)
    engine.snapshot()(str(tmp_path))
    assert not engine.optimizer.state and torch.load(tmp_path / "optimizer.pt", weights_only=True) == {}
    resumed = HFTrainEngine(tiny_model, ACTOR, SAMPLING)
    resumed.restore(str(tmp_path), 3)
    assert resumed.version == 3 and not resumed.optimizer.state
