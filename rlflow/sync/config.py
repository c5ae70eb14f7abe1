"""SparseRL-Sync's settings, and the relay tree of rollout replicas that ``fanout`` defines.

Torch-free, like every config module (``rlflow/errors.py``): the launcher plans the relay tree and
checks the settings without importing torch; ``weights.py`` moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlflow.errors import require, require_counts


MAX_WINDOW = 64  # transfer/channel.MAX_PARKED_PER_PEER: a window that large would be refused as a flood

@dataclass
class SyncConfig:
    """SparseRL-Sync: how policy versions travel from the actor to the rollout replicas."""

    dtype: str | None = None
    """Dtype the weights are diffed and sent in (float32 | bfloat16 | float16); null: rollout.dtype."""
    sparse: bool = True
    """Send only the elements whose bits changed; false: a full snapshot every version."""
    compress: bool = True
    """Byte-shuffle and zstd each patch section where that saves at least 10%."""
    values: str = "xor"
    """xor: patches carry new XOR old bits (about 1.7x smaller compressed at RL learning rates; bit-exact, applies
    only to the exact base it names, which every replica checks anyway); new: the new values (a pure scatter)."""
    fanout: int = 1
    """Relay topology of rollout replicas: 1 = chain, k = tree of k children per node, 0 = all pull from the actor."""
    chunk_kb: int = 1024
    """Chunk size: a chain of N replicas takes about (1 + (N - 1) / K) transfer times for an object of K chunks."""
    window: int = 4
    """Chunk requests in flight per hop (keeps each link busy while chunks are checked and forwarded)."""
    hop_timeout: float = 10.0
    """Seconds a peer may take to hand over a chunk before the replica asks the actor directly."""
    keyframe_ratio: float = 1.0
    """Cut a new full snapshot once the patches since the last one add up to this fraction of its size."""
    uplink_mb_s: float = 0.0
    """Pace what each node sends to this many MB/s (0: unpaced): a shared link's courtesy, or a network emulated on one host."""

    def check(self, at: str = "sync") -> None:
        """This component's own fields; that ``dtype`` is the rollout's is checked with the run (``RunConfig``)."""
        require(self.values in ("new", "xor"), f"{at}.values", f"choose 'new' or 'xor', got {self.values!r}")
        require(self.fanout >= 0, f"{at}.fanout",
                f"must be >= 0 (0: every replica pulls from the actor, 1: a chain), got {self.fanout}")
        require_counts(self, at, "chunk_kb", "window")
        require(self.window < MAX_WINDOW, f"{at}.window", f"must be below {MAX_WINDOW} (a node parks at most "
                f"{MAX_WINDOW} requests of one peer and queues at most that many replies to it), got {self.window}")
        require(self.keyframe_ratio > 0, f"{at}.keyframe_ratio", f"must be > 0, got {self.keyframe_ratio}")
        require(self.hop_timeout > 0, f"{at}.hop_timeout", f"must be > 0 seconds, got {self.hop_timeout}")
        require(self.uplink_mb_s >= 0, f"{at}.uplink_mb_s", f"must be >= 0 (0: unpaced), got {self.uplink_mb_s}")


def relay_parent(replica: int, fanout: int) -> int | None:
    """The replica that ``replica`` pulls from (None: the actor). fanout 1 is a chain, 0 the actor for all."""
    if fanout <= 0:
        return None
    parent = replica // fanout - 1
    return parent if parent >= 0 else None


def relays_to_others(replica: int, replicas: int, fanout: int) -> bool:
    return any(relay_parent(r, fanout) == replica for r in range(replicas))
