"""The command line's overrides: every key must be a setting, and a resumed run changes only what is safe.

Two rules on the ``key=value`` arguments of ``rlflow`` and ``rlflow doctor``:

- **Known keys only.** A key that is not a field of ``RunConfig`` is refused before Hydra composes
  anything, with the nearest setting's name: Hydra's own advice after a typo is to add it with ``+``
  (``+flow.stalenes=2``), which adds a key nothing reads and runs with the default. Keys under a field
  that is a free mapping (``ray.runtime_env``, ``ray.resources``, a role's ``custom``) are the user's.
- **Retired keys are named.** A setting rlflow no longer has (``RETIRED``) is refused with what took
  its place, on a command line, in a user's recipe file (``check_recipe_file``), and in a resumed run's
  saved settings, where it is dropped when it held the value now read from its replacement
  (``retire``).
- **A resumed run keeps its experiment** (``flow/resume.py``): an override on a resume command line may
  change how long, how fast, where or how observably the run goes (``RESUMABLE``), never what it
  computes (task, data, model, reward, group sizes, the algorithm).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from rlflow.flow.config import ConfigError

RESUMABLE = (
    "run_dir", "resume", "launcher", "ray.", "tracking.", "supervision.", "model.cache_dir",
    "flow.steps", "flow.wait_seconds", "flow.lease_seconds", "flow.shutdown_seconds", "flow.bus_capacity_rows",
    "flow.bus_capacity_bytes",
    "rollout.replicas", "rollout.threads", "rollout.device", "rollout.max_batch", "rollout.groups_per_call",
    "rollout.sglang.",
    "reward.replicas", "reward.batch", "reward.timeout_s", "reward.max_failed_steps",
    "reference.replicas", "reference.threads", "reference.device",
    "actor.replicas", "actor.threads", "actor.device", "actor.micro_batch", "actor.max_tokens_per_microbatch",
    "actor.parallel", "actor.activation_checkpointing", "actor.checkpoint_every", "actor.checkpoint_keep",
    "actor.padding_free", "actor.attn_implementation", "actor.lora.final",
    "sync.sparse", "sync.compress", "sync.values", "sync.fanout", "sync.chunk_kb", "sync.window", "sync.hop_timeout",
    "sync.keyframe_ratio", "sync.uplink_mb_s",
    "eval.",
)
"""Settings a resume may change (a trailing dot: everything under it). Each changes how long (more steps),
how fast or where (replicas, threads, devices, batching of work, the weight transport, which is bit-exact
whatever its settings), or how observably (tracking, periodic evaluation) the run goes, but not the samples' distribution or
the update rule: a resumed run with them changed is still the experiment it was."""


RETIRED = {  # a setting rlflow no longer has -> (the key now read in its place, why)
    "actor.temperature": ("rollout.temperature", "the trainer scores logprobs at the rollout's sampling temperature"),
    "actor.max_new_tokens": ("rollout.max_new_tokens", "aggregation=constant divides by the rollout's longest response"),
}


def retired(key: str) -> str | None:
    """The message refusing ``key`` when it is a retired setting (None: it is not)."""
    if key not in RETIRED:
        return None
    replacement, why = RETIRED[key]
    return f"{key}: no longer a setting ({why}); set {replacement} instead, or drop the key"


def check_recipe_file(path: str) -> None:
    """Refuse a user's recipe file that sets a retired key (before Hydra, whose error would not say why)."""
    from omegaconf import DictConfig, OmegaConf

    try:
        recipe = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - unreadable or not YAML: Hydra's own error says so
        return
    for key in RETIRED:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(recipe, parent_key)  # the node: the key's own value may not resolve here
        if isinstance(parent, DictConfig) and leaf in parent.keys():
            raise ConfigError(f"{path}: {retired(key)}")


def retire(saved, saved_path) -> None:
    """Drop the retired keys from a run's saved settings (``saved``, a loaded config.yaml) when each held
    the value its replacement holds (recipes tied them); refuse when it did not, since this version of
    rlflow cannot compute what that run computed."""
    from omegaconf import OmegaConf

    from rlflow.flow.config import RunConfig

    for key, (replacement, why) in RETIRED.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(saved, parent_key)
        if parent is None or leaf not in parent:
            continue
        now = OmegaConf.select(saved, replacement, default=OmegaConf.select(OmegaConf.structured(RunConfig), replacement))
        if parent[leaf] != now:
            raise ConfigError(f"resume: {saved_path} has {key}={parent[leaf]!r} but {replacement}={now!r}, and {why} "
                              f"now; start a new run from the checkpoint's weights instead (model.path=...)")
        del parent[leaf]


@dataclass
class Override:
    """One ``key=value`` of a command line, as Hydra parses it."""

    key: str
    text: str  # as given, for messages
    sweep: bool  # key=a,b (a multirun sweep)


def parse(args: list[str]) -> list[Override]:
    """The overrides among ``args`` (Hydra's grammar); a malformed one is left for Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, out = OverridesParser.create(), []
    for text in args:
        try:
            o = parser.parse_override(text)
        except HydraException:
            continue
        out.append(Override(o.key_or_group, text, o.is_sweep_override()))
    return out


def resumable(key: str) -> bool:
    """Whether a resume may change ``key`` (a whole node such as ``tracking`` when all under it may)."""
    return any(key == p or (p.endswith(".") and (key.startswith(p) or key + "." == p)) for p in RESUMABLE)


def check_keys(overrides: list[Override]) -> None:
    """Refuse a key that is no setting of rlflow, naming the nearest one."""
    for _, message in unknown(overrides):
        raise ConfigError(message)


def unknown(overrides: list[Override]) -> list[tuple[Override, str]]:
    """The overrides whose key is no setting of rlflow, each with a message naming the nearest setting."""
    keys, free = schema_keys()
    out = []
    for o in overrides:
        if o.key.startswith(("hydra.", "hydra/")) or o.key in keys or any(o.key.startswith(p + ".") for p in free):
            continue
        if retired(o.key):
            out.append((o, f"{retired(o.key)} ({o.text!r})"))
            continue
        near = nearest(o.key, keys)
        hint = f"did you mean {near}?" if near else "`rlflow --cfg job` prints every setting"
        out.append((o, f"{o.key}: not a setting of rlflow ({o.text!r}); {hint}"))
    return out


def nearest(key: str, keys: set[str]) -> str | None:
    """The settings ``key`` most likely meant: those with the same last part, else the closest spelling."""
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:  # the closest spelling first
        ranked = sorted(same_leaf, key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
        return " or ".join(ranked[:4])
    close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
    return close[0] if close else None


def schema_keys() -> tuple[set[str], set[str]]:
    """(every dotted key of RunConfig, the keys that are free mappings: anything below them is allowed)."""
    from omegaconf import DictConfig, OmegaConf

    from rlflow.flow.config import RunConfig

    keys, free = set(), set()

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node.keys():
            key = f"{prefix}{name}"
            keys.add(key)
            child = node._get_node(name)
            if isinstance(child, DictConfig):
                if OmegaConf.get_type(child) is dict:
                    free.add(key)
                else:
                    walk(child, key + ".")

    walk(OmegaConf.structured(RunConfig), "")
    return keys, free
