"""sglang's HTTP API as we use it: a client, the requests we build, the responses we accept, and the
process group the trainer forms with servers for update=distributed.

Shapes follow sglang 0.5.x's own server (``http_server.py``, ``io_struct.py``); features that arrived
later (pause modes in 0.5.6) are used only when the server's version has them. The engine that uses all
this, and why the update sequence is what it is, is ``engines/sglang.py``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rlflow.engines.base import Generation, SamplingParams

FLUSH_RETRY_S = 0.5  # between flush attempts while the scheduler finishes aborting


class SGLangError(RuntimeError):
    """An sglang endpoint failed; the message names the endpoint, the status and the server's answer."""


class SGLangClient:
    """sglang's HTTP endpoints as methods. Only the standard library: the server may be anywhere."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 1800.0):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        self.version: tuple[int, ...] | None = None  # the server's sglang version, once known

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
             accept: tuple[int, ...] = (200,)) -> tuple[int, object]:
        """(status, decoded body: JSON, or text when not JSON). A status outside ``accept`` raises SGLangError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise SGLangError(f"{method} {self.url}{path}: no answer ({e})") from e
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        if status not in accept:
            raise SGLangError(f"{method} {path} -> {status}: {str(payload)[:500]}")
        return status, payload

    def server_info(self) -> dict:
        _, info = self.call("GET", "/get_server_info")
        self.version = parse_version(info.get("version", "0"))
        return info

    def model_info(self) -> dict:
        return self.call("GET", "/get_model_info")[1]

    def generate(self, request: dict) -> list[dict]:
        _, out = self.call("POST", "/generate", request)
        return out if isinstance(out, list) else [out]

    def pause(self) -> None:
        """Abort-mode pause: returns once every in-flight request has come back aborted."""
        modes = self.version is None or self.version >= (0, 5, 6)  # before 0.5.6 every pause aborts
        self.call("POST", "/pause_generation", {"mode": "abort"} if modes else {})

    def resume(self) -> None:
        self.call("POST", "/continue_generation", {})

    def update_from_disk(self, path: str, version: int) -> None:
        body = {"model_path": path, "weight_version": str(version), "abort_all_requests": False}
        if self.version is None or self.version >= (0, 5, 6):  # before 0.5.6 the server always flushes
            body["flush_cache"] = True
        _, out = self.call("POST", "/update_weights_from_disk", body, accept=(200, 400))
        _check_success(out, "/update_weights_from_disk")

    def update_from_tensor(self, serialized: list[str], version: int, flush: bool) -> None:
        _, out = self.call("POST", "/update_weights_from_tensor",
                           {"serialized_named_tensors": serialized, "weight_version": str(version),
                            "flush_cache": flush, "abort_all_requests": False}, accept=(200, 400))
        _check_success(out, "/update_weights_from_tensor")

    def init_update_group(self, host: str, port: int, rank_offset: int, world_size: int, group: str,
                          backend: str) -> None:
        """Join the trainer's process group (blocks until every member has joined)."""
        _, out = self.call("POST", "/init_weights_update_group",
                           {"master_address": host, "master_port": port, "rank_offset": rank_offset,
                            "world_size": world_size, "group_name": group, "backend": backend}, accept=(200, 400))
        _check_success(out, "/init_weights_update_group")

    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group: str,
                                version: int) -> None:
        """Receive the tensors the trainer broadcasts next, in this order (blocks until they arrived)."""
        _, out = self.call("POST", "/update_weights_from_distributed",
                           {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group,
                            "flush_cache": True, "abort_all_requests": False, "weight_version": str(version)},
                           accept=(200, 400))
        _check_success(out, "/update_weights_from_distributed")

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load peft's adapter files at ``path`` (on the server's filesystem) as adapter ``name``."""
        _, out = self.call("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path}, accept=(200, 400))
        _check_success(out, "/load_lora_adapter")

    def unload_lora_adapter(self, name: str) -> None:
        _, out = self.call("POST", "/unload_lora_adapter", {"lora_name": name}, accept=(200, 400))
        _check_success(out, "/unload_lora_adapter")

    def weight_version(self) -> str:
        return str(self.model_info().get("weight_version"))

    def set_weight_version(self, version: int) -> None:
        _, out = self.call("POST", "/update_weight_version",
                           {"new_version": str(version), "abort_all_requests": False}, accept=(200, 400))
        _check_success(out, "/update_weight_version")

    def flush_cache(self, timeout: float) -> None:
        """Flush the radix cache, retrying while the server says it is busy (400), up to ``timeout``."""
        deadline, attempts = time.monotonic() + timeout, 0
        while True:
            attempts += 1
            status, out = self.call("POST", "/flush_cache", accept=(200, 400))
            if status == 200:
                return
            if time.monotonic() + FLUSH_RETRY_S > deadline:
                raise SGLangError(f"POST /flush_cache refused {attempts} times in {timeout:.0f}s "
                                  f"(rollout.sglang.flush_timeout); last answer: {str(out)[:300]}")
            time.sleep(FLUSH_RETRY_S)


def _check_success(out, endpoint: str) -> None:
    if not (isinstance(out, dict) and out.get("success")):
        raise SGLangError(f"{endpoint} failed: {str(out)[:500]}")


def parse_version(text: str) -> tuple[int, ...]:
    """'0.5.10.post1' -> (0, 5, 10), '0.4.9rc1' -> (0, 4, 9): the numeric release, for feature checks."""
    import re

    return tuple(int(x) for x in re.findall(r"\d+", re.match(r"[\d.]*\d", str(text)).group(0))) \
        if re.match(r"\d", str(text)) else ()


# ---------------------------------------------------------------------------- requests and responses
def sampling_params(s: SamplingParams, stop_ids: list[int]) -> dict:
    """sglang's sampling_params for ``s``: every field explicit (sglang's own defaults differ)."""
    return {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else -1,  # sglang: -1 is off, 0 is invalid
            "min_p": 0.0, "stop_token_ids": list(stop_ids), "ignore_eos": False, "no_stop_trim": True,
            "skip_special_tokens": False, "n": 1}


def generate_request(prompts: list[list[int]], sampling: SamplingParams, stop_ids: list[int],
                     rids: list[str], adapter: str | None = None) -> dict:
    """One batched /generate: token ids in, per-token logprobs of the outputs only, one rid per sequence;
    ``adapter``: the loaded LoRA adapter every sequence runs with (sglang's ``lora_path`` takes its name)."""
    if len(rids) != len(prompts) or len(set(rids)) != len(rids):
        raise ValueError("one distinct rid per prompt")
    request = {"input_ids": [list(p) for p in prompts], "sampling_params": sampling_params(sampling, stop_ids),
               "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0, "rid": list(rids),
               "stream": False}
    if adapter is not None:
        request["lora_path"] = adapter
    return request


def parse_output(item: dict) -> tuple[str, list[int], list[float], str]:
    """A /generate result as (finish kind, output token ids, their logprobs, the weight version it ran at).

    Checks what the rest of the system relies on: one logprob per output token, for that token. An
    aborted result (kind ``abort``) carries what was generated before the abort: nothing when it was
    aborted in the waiting queue."""
    meta = item.get("meta_info")
    if not isinstance(meta, dict) or "finish_reason" not in meta:
        raise SGLangError(f"/generate returned an item without meta_info.finish_reason: {str(item)[:300]}")
    reason = meta["finish_reason"] or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind not in ("stop", "length", "abort"):
        raise SGLangError(f"/generate finished with an unknown reason {reason!r}")
    ids = item.get("output_ids")
    logprobs = meta.get("output_token_logprobs")
    if kind == "abort" and not ids:
        ids, logprobs = [], []
    if ids is None or logprobs is None:
        raise SGLangError("/generate returned no output_ids or output_token_logprobs: was return_logprob sent?")
    if len(logprobs) != len(ids):
        raise SGLangError(f"/generate returned {len(logprobs)} logprobs for {len(ids)} output tokens")
    for entry, token in zip(logprobs, ids):
        if entry[1] != token:
            raise SGLangError(f"/generate logprob entry {entry!r} is for token {entry[1]}, the output has {token}")
    return kind, [int(t) for t in ids], [float(e[0]) for e in logprobs], str(meta.get("weight_version"))


def parse_generation(item: dict, expect_version: str | None) -> Generation | None:
    """A /generate result as a Generation; None when the server aborted it (send it again). The weight
    version it ran at must be the one the engine installed (``expect_version``; None: no check)."""
    kind, ids, logprobs, served = parse_output(item)
    if kind == "abort":
        return None
    if expect_version is not None and served != expect_version:
        raise SGLangError(f"/generate ran at weight version {served!r} but this engine "
                          f"installed {expect_version!r}: another client updated the server, or an update was lost")
    return Generation(ids, logprobs, kind, int(served) if served.isdigit() else None)


def rids_for(prefix: str, call: int, n: int) -> list[str]:
    """Fixed-width rids: none is a prefix of another (sglang's abort matches rid prefixes)."""
    return [f"{prefix}-{call:010d}-{i:06d}" for i in range(n)]


def update_group(backend: str, host: str, port: int, world_size: int, rank: int, name: str, timeout: float):
    """A process group outside torch's default one, formed the way sglang forms its side of it
    (``init_custom_process_group``: tcp rendezvous, the store prefixed by the group's name), so the
    trainer (rank 0) and every server rank meet in the same keys. Uses torch's group helper, as sglang does."""
    import datetime

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    delta = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=delta))
    store.set_timeout(delta)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(name, store),
                                      group_name=name, backend_options=None, timeout=delta)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
