"""FSDP2 sharding of the trained model (``actor.parallel=fsdp``): parameters, gradients and AdamW state
split over the trainer ranks, so each holds about 1/N of them.

Design decisions:
- Units: ``fully_shard`` on every decoder layer (the classes a Hugging Face model names in
  ``_no_split_modules``, e.g. ``Qwen2DecoderLayer``), then on the root, which keeps what is left
  (embeddings, final norm, the tied or untied lm head) as one more unit. A layer's parameters are
  all-gathered just before its forward and freed after it, so a rank's peak is its shard plus one layer.
- Parameters become DTensors sharded on dim 0 (uneven rows allowed); the optimizer is built over them,
  so its state is sharded the same way and ``optimizer.step`` touches only local rows.
- Gradients: FSDP reduce-scatters the *mean* over ranks. The actor accumulates un-normalised sums and
  divides by the whole step's normaliser (``algo/step.py``), so the engine multiplies by the world size
  ``shard`` returns: gloo cannot run the pre-multiplied sum that would make FSDP sum instead.
- Mixed precision: with ``param_dtype`` bfloat16 (GPU) layers compute in bf16 and gradients are reduced in
  float32 onto float32 master shards; the optimizer never sees bf16.
- Where the model lives (``load_model``): rank 0 reads the weights on the host, the other ranks build
  the model on the meta device, every rank shards it and holds only its own rows on the device (the
  mesh's device type), which rank 0 sends them: host memory holds the model once, device memory 1/N.
- Lockstep: every forward and backward is a collective, so every rank must run the same number of passes
  per step. The actor defers a step's passes until its share of the groups is in and the ranks agree on
  the count (``TrainerGroup.most``); a rank with fewer runs idle passes that add exactly zero.

Gathered views: ``full_state`` brings the whole model (or optimizer state) to rank 0's host memory one
tensor at a time; ``full_views`` gives every rank one gathered tensor at a time (for checks).

Sharded checkpoints (``save_sharded``, ``load_sharded``): PyTorch Distributed Checkpoint, each rank
writing its own rows of the model and AdamW state (a ``.distcp`` file per rank and a ``.metadata``).
Saving stages the rows in host memory (the step waits for that only) and writes them in the background,
over a process group of its own so its collectives never interleave with training's. Loading reads any
layout into any other: a checkpoint of 2 ranks loads on 4, or into one unsharded model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes in ``_no_split_modules`` (Hugging Face's list
    of what must stay whole), else the children of its largest ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"actor.parallel=fsdp shards a model per decoder layer, but {type(model).__name__} names "
                         f"no _no_split_modules and has no ModuleList of layers")
    return list(max(lists, key=len))


def shard(model: torch.nn.Module, device: str, param_dtype: str = "float32") -> int:
    """Apply FSDP2 to ``model`` (on the host) over every rank of the default process group, moving each
    rank's shard to ``device``; returns the world size (what its reduce-scattered gradients are averaged
    over). The process group must be initialised (``load_model`` checks it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from rlflow.engines.hf import DTYPES

    world = dist.get_world_size()
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh(kind, (world,))
    dtype = DTYPES[param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return world


def load_model(path: str, device: str, param_dtype: str = "float32", prepare=None,
               attention: str | None = None) -> tuple[torch.nn.Module, int]:
    """The checkpoint at ``path`` as a sharded fp32 model on ``device`` (every rank calls it); returns
    (model, world size). Only rank 0 reads the weights, on the host: the other ranks build the model's
    skeleton on the meta device (no memory), every rank shards it, the shards are made real on the
    device, and rank 0 sends each rank its rows and the buffers (rotary frequencies and the like). So
    the host holds the whole model once, not once per rank. ``prepare(model)`` runs before sharding and
    returns the model to shard (activation checkpointing, LoRA adapters: rank 0 draws them, and sends them
    with the rest). ``attention``: transformers' attention kernel (None: its default)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    if not dist.is_initialized():
        raise RuntimeError("actor.parallel=fsdp needs the trainer ranks' process group (roles/actor.py starts it)")
    lead = dist.get_rank() == 0
    kernel = {"attn_implementation": attention} if attention else {}
    if lead:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kernel)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32, **kernel)
    model.train()
    if prepare is not None:
        model = prepare(model)
    whole = model.state_dict() if lead else {}  # kept alive through sharding: what rank 0 sends
    world = shard(model, device, param_dtype)
    target = torch.device(device)
    if not lead:
        model.to_empty(device=target)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    for _, buffer in model.named_buffers():  # not sharded, so not in the broadcast above
        if buffer.device != target:
            buffer.data = buffer.data.to(target)
        dist.broadcast(buffer, src=0)
    return model, world


def checkpoint_group():
    """A gloo group of every rank, for sharded checkpoint writes running beside training (a collective)."""
    return dist.new_group(backend="gloo")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``shard`` sharded ``model`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return isinstance(next(model.parameters()), DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def scalar(t) -> float:
    """A float of a (possibly replicated DTensor) scalar, e.g. ``clip_grad_norm_``'s total norm."""
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
               frozen: bool = True) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict keyed by parameter name), whole, in host memory: on rank 0
    of a sharded model (empty on the others: a collective every rank must call), or copied from a plain one.
    Names, not positions, key the optimizer state, so it loads into a model sharded over any number of ranks.
    ``frozen=False``: frozen parameters left out (what remains: the adapters of LoRA, buffers, and a frozen
    weight's tied alias: callers keep the names they want)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)
    weights = get_model_state_dict(model, options=options)
    optim = None
    if optimizer is not None:  # an optimizer that never stepped has no state to save: asking torch for it
        # would make one with a step at lr 0 (AdamW's step count then 1), on this rank only
        optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else {}
    if not is_sharded(model):  # the plain model's tensors can be the live ones: copy them now
        weights, optim = host_copy(weights), host_copy(optim)
    return weights, optim


def load_full(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (some of the model's parameters, by name; every rank passes the same) into a
    sharded model: each rank keeps its own rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """Load a state ``full_state`` wrote into ``optimizer`` (over a model sharded any way); with a sharded
    model only rank 0 passes ``state``, and it is broadcast to the others' shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    sharded = is_sharded(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state if state is not None else {}, options=options)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str, group):
    """Stage this rank's rows of the model and optimizer state in host memory now and write them to
    ``directory`` in the background (a collective of ``group``); returns the write's future."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:  # never stepped (see full_state): the model alone
        return dcp.async_save({"model": get_model_state_dict(model)}, checkpoint_id=directory, process_group=group)
    weights, optim = get_state_dict(model, optimizer)
    return dcp.async_save({"model": weights, "optim": optim}, checkpoint_id=directory, process_group=group)


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, directory: str, group=None) -> None:
    """Load what ``save_sharded`` wrote into ``model`` (and ``optimizer``), however either is sharded
    now (a collective of ``group`` when the process group is up; a plain read without one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    if optimizer is None or not any(k.startswith("optim.") for k in saved):  # the model alone (see save_sharded)
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=directory, process_group=group)
        set_model_state_dict(model, state["model"])
        return
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=directory, process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def local_rows(model: torch.nn.Module, names: set[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, list[int]]]:
    """This rank's rows of every parameter (or of those in ``names``; tied ones once, empty shards left
    out), where they sit in the whole tensor ([start, stop) on dim 0) and every whole tensor's shape: what
    a rank publishes of the model without gathering it. FSDP2 splits dim 0 as ``torch.chunk`` does:
    ceil(rows / N) per rank."""
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    local, rows, shapes = {}, {}, {}
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        shapes[name] = list(p.shape)
        if not isinstance(p, DTensor):
            raise TypeError(f"{name} is not sharded: local_rows reads a model fully_shard has sharded")
        part = p.to_local().detach()
        size = -(-p.shape[0] // world)
        start = min(rank * size, p.shape[0])
        stop = min(start + size, p.shape[0])
        if part.shape[0] != stop - start:
            raise RuntimeError(f"{name}: this rank holds {part.shape[0]} rows, not rows {start}:{stop} of "
                               f"{p.shape[0]} (FSDP2 split dim 0 another way)")
        if stop > start:
            local[name], rows[name] = part, [start, stop]
    return local, rows, shapes


def full_views(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole parameter) in name order, gathered on every rank one at a time (a collective)."""
    from torch.distributed.tensor import DTensor

    for name, p in sorted(model.named_parameters()):
        yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def host_copy(obj):
    """``obj`` with every tensor in it copied to host memory (a state dict, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj
