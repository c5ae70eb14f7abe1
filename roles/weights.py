"""The weight channel: the actor publishes each policy version; rollouts load the newest they need.

A version is the full set of policy parameters in safetensors format, one frame, with a blake2b
checksum of the bytes in its metadata (checked on receipt). The transport is the versioned channel
of ``transfer/channel.py``: only the newest version is held, a rollout that missed versions gets the
newest, and a wait for a version has a bound. Sparse patches (base -> new) replace full snapshots in
the next step of the product; the version numbering and the checksum stay.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from transfer.channel import Publisher, Subscriber


def _checksum(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class WeightPublisher:
    def __init__(self, address: str):
        self.channel = Publisher(address)
        self.address = self.channel.address

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Publish ``weights`` as ``version``; returns the bytes sent per subscriber."""
        data = st_save({k: v.detach().contiguous().cpu() for k, v in weights.items()})
        self.channel.publish(version, [data], {"checksum": _checksum(data), "bytes": len(data)})
        return len(data)

    def close(self) -> None:
        self.channel.close()


class WeightSubscriber:
    def __init__(self, address: str):
        self.channel = Subscriber(address)

    def latest_version(self, than: int, timeout: float) -> int | None:
        """The publisher's version if newer than ``than`` (waiting up to ``timeout``), without the weights."""
        item = self.channel.newer(than, timeout, payload=False)
        return None if item is None else item.version

    def newer(self, than: int, timeout: float = 0.0, required: bool = False) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(version, weights) newer than ``than``; None if none came in ``timeout`` (an error if ``required``)."""
        if required:
            item = self.channel.wait_newer(than, timeout, what="policy weights")
        else:
            item = self.channel.newer(than, timeout)
            if item is None:
                return None
        data = item.frames[0].buffer
        if _checksum(data) != item.meta["checksum"]:
            raise ValueError(f"weights of version {item.version} failed their checksum: corrupted in transit")
        return item.version, st_load(bytes(data))

    def close(self) -> None:
        self.channel.close()
