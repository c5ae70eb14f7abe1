"""LoRA adapters through peft (``actor.lora``): how adapters are made, named, saved, loaded and merged.

Design decisions:
- One wrap everywhere (``wrap``): peft's ``get_peft_model`` with the run's ``LoraConfig``. The trainer and
  the hf rollout wrap the same base the same way, so their adapter parameters carry the same names, and
  a policy version is just those tensors (``policy``): weight sync, data-parallel all-reduce, the
  optimizer and checkpoints all see the adapters only. The base stays frozen, and it never travels.
- Dropout 0 and no bias training: the trainer's forward is deterministic and equal to the rollout's, so
  π_θ/μ is 1 on-policy, as without adapters.
- Adapters take the base's dtype (peft would up-cast them to float32 on a bfloat16 model): the rollout
  holds them in the sync dtype, which bit-exact patches need. The trainer's base is float32 anyway.
- Version 0 is the base model exactly: peft starts B at zero. A is random, drawn by the trainer (after the
  run's seed, so data-parallel replicas draw the same; a sharded trainer's rank 0 draws it and sends
  every rank its rows). The first publication is a keyframe, so a rollout's own random A never serves.
- Files are peft's (``adapter_config.json`` + ``adapter_model.safetensors``, tensor names without the
  adapter's name): ``PeftModel.from_pretrained(base, dir)``, transformers with peft installed, and
  sglang's ``/load_lora_adapter`` all read them. The config names the base (``base_model_name_or_path``).
- Merging is peft's ``merge_and_unload`` (W + alpha / r · B A) in float32 on a host copy of the base read
  from disk (``export_merged``), never on the live model. An adapter on a layer that shares its weight
  with the input embeddings (a tied ``lm_head``) is refused: merging it would change the embeddings too.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

ADAPTER = "default"  # peft's name for the one adapter a model has; part of every adapter parameter's name
FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_config(cfg, base: str | None = None):
    """peft's LoraConfig for ``cfg`` (the run's ``actor.lora``); ``base``: the path it applies to."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base)


def wrap(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``model`` with adapters on the ``cfg.target_modules`` linear layers; only the adapters train."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise ImportError(f"actor.lora.rank={cfg.rank} trains adapters with peft, which is not installed here: "
                          f"pip install 'rlflow[lora]'") from None
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    try:
        with _quiet():
            wrapped = get_peft_model(model, peft_config(cfg), autocast_adapter_dtype=False)
    except ValueError as e:  # peft: target modules not found
        raise ValueError(f"actor.lora.target_modules={list(cfg.target_modules)} does not fit {type(model).__name__} "
                         f"({e}); its linear layers are named {linear}") from None
    tied = [name for name, m in wrapped.named_modules()
            if getattr(getattr(m, "base_layer", None), "weight", None) is embedding and embedding is not None]
    if tied:  # merging would add the output layer's update to the input embeddings it shares
        raise ValueError(f"actor.lora.target_modules={list(cfg.target_modules)}: {tied[0]} shares its weight with the "
                         f"input embeddings (tie_word_embeddings), so its adapter cannot be merged into the model; "
                         f"leave it out (the model's other linear layers: {[n for n in linear if n != tied[0].rsplit('.', 1)[-1]]})")
    return wrapped


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries adapters (``wrap``; peft marks its models with ``peft_config``)."""
    return hasattr(model, "peft_config")


def policy(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What a policy version is, by name: the adapters of a wrapped model (what trains), every parameter
    (tied ones once) of a plain one."""
    if is_wrapped(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    return dict(model.named_parameters())


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under the adapters (the model itself when it has none)."""
    return model.get_base_model() if is_wrapped(model) else model


def file_name(name: str) -> str:
    """An adapter parameter's name as peft's files spell it: without the adapter's name."""
    return name.replace(f".{ADAPTER}.", ".")


def model_name(name: str) -> str:
    """The inverse of ``file_name``: ``...q_proj.lora_A.weight`` -> ``...q_proj.lora_A.default.weight``."""
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return name.replace(part, f"{part}{ADAPTER}.")
    raise ValueError(f"{name!r} is not a LoRA adapter tensor (no lora_A or lora_B in its name)")


def save_adapter(weights: dict[str, torch.Tensor], cfg, base: str, directory: str | Path) -> None:
    """Write ``weights`` (adapter parameters by the model's names) as peft's adapter files in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({file_name(k): v.detach().to("cpu").contiguous() for k, v in weights.items()},
              str(directory / FILES[1]), metadata={"format": "pt"})
    peft_config(cfg, base).save_pretrained(str(directory))


def load_adapter(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of peft's files in ``directory``, by the model's names (safetensors: no code runs)."""
    from safetensors.torch import load_file

    path = Path(directory) / FILES[1]
    if not path.is_file():
        raise ValueError(f"{directory} holds no {FILES[1]}: not a LoRA adapter directory")
    return {model_name(k): v for k, v in load_file(str(path)).items()}


def adapter_base(directory: str | Path) -> str | None:
    """The base model an adapter directory names (``base_model_name_or_path``), if any."""
    try:
        return json.loads((Path(directory) / FILES[0]).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def read_config(directory: str | Path):
    """The ``LoraConfig`` (rank, alpha, target modules) an adapter directory was written with."""
    from rlflow.engines.config import LoraConfig

    config = json.loads((Path(directory) / FILES[0]).read_text())
    return LoraConfig(rank=config["r"], alpha=config["lora_alpha"], target_modules=sorted(config["target_modules"]))


def export_merged(adapter: str | Path, base: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write base + adapter merged (``merge_and_unload``) to ``out`` as ``from_pretrained`` weights and config.
    Reads the base from disk on the host in float32, as the trainer holds it, and merges there: a bfloat16
    base would round the adapters' update away (measured: logprobs off by 1e-2). ``dtype``: what the merged
    weights are saved in (rounded after the merge)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with _quiet():
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.to(dtype).save_pretrained(str(out))


@contextlib.contextmanager
def _quiet():
    """peft asks transformers a deprecated question (``is_gradient_checkpointing``): nothing for a user to do;
    and it warns of an adapter on a tied layer, which ``wrap`` refuses with its own error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        warnings.filterwarnings("ignore", ".*tie_word_embeddings.*", UserWarning)
        yield
