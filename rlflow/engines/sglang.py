"""The sglang rollout engine (``rollout.engine=sglang``): generation on an sglang server, over its HTTP API.

rollout.update=in_flight: a request per sequence, an update's pause cutting those in flight and each
resumed from what it had on the new weights (``_stream``).

Each rollout replica drives one sglang server: one it launches on its own GPU(s) (``rollout.sglang.url``
null; needs the ``sglang`` extra) or one already running (``rollout.sglang.url``). The engine knows
nothing of the bus; the rollout role calls ``generate`` and, between calls, ``load_weights``.

Generation. One batched ``/generate`` per call with ``input_ids``, explicit sampling parameters (sglang's
defaults come from the model's generation config otherwise; its max_new_tokens default is 128),
``return_logprob`` and one rid per sequence. The rids have a fixed width, so none is a prefix of
another (sglang aborts by rid prefix). sglang's output logprobs are log softmax(logits / T) before any
top-p/top-k cut, the convention of ``engines/hf.py``, unless the server runs with
SGLANG_RETURN_ORIGINAL_LOGPROB=1: a launched server never does, and a server you connect to must not.
Every response must carry the weight version the engine last installed, or the call fails: a sample
must never be attributed to the wrong policy. Sequences aborted by the server (``finish_reason`` abort)
are sent again, up to ``max_retries`` times.

Weight updates (``load_weights``), always in this order:
    pause_generation(mode=abort)   every in-flight request returns (aborted): the scheduler is idle
    update                         from disk (a safetensors snapshot the server reads) or from tensors
                                   (CUDA IPC handles, same host), tagged with weight_version
    update_weight_version          again, without aborting: sglang 0.5.6 drops the tag while paused
    flush_cache                    the radix cache holds KV of the old weights; retried while busy
    continue_generation
then ``/model_info`` must report the new version. With LoRA (``actor.lora``) the base never changes and
a version is its adapters: written as peft's files in ``update_dir``, loaded under a name of their own
(``/load_lora_adapter``), tagged, the previous adapter unloaded, the cache flushed; every later
``/generate`` names that adapter (``lora_path``). No pause: the replica updates between its own calls,
and another adapter's requests never run on this one. Until the new adapter is in and tagged (or after
a load failed) ``generate`` refuses: the bare base is no version of the run's policy. The server is
launched with ``--enable-lora``, the run's rank and target modules; a server at ``rollout.sglang.url``
must report them (``require_lora_server``), and ``close`` unloads what this engine loaded there.
Adapters travel as files, never through sglang's from-tensors route, which unpickles what it is sent.
With update=distributed the trainer runs the same
sequence itself for every server (``WeightBroadcaster``), broadcasting the tensors through a process
group the servers joined, and the replica only waits for the version it needs and reads each sample's
version from the response. Only ``abort`` pauses: sglang flushes its cache only
when the scheduler is idle, which neither ``retract`` nor ``in_place`` guarantees, and a failed flush
after an update has crashed sglang's scheduler (<= 0.5.15). A failed step raises, naming the endpoint
and the server's answer, and generation is not resumed on half-updated weights.

Credentials. A launched server always takes an API key (``server_key``): ``rollout.sglang.api_key``,
else one the launcher made for the run (update=distributed: the trainer presents it too), else one
this replica makes for itself, so it travels nowhere. On a GPU host any local user could otherwise
generate with the server or push weights into it. The key goes to the server in a 0600 config file (``--config``), not on its
command line, which every local user can read in the process list; an sglang without config files
gets ``--api-key``, with a warning that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from rlflow.engines.base import Generation, SamplingParams, Sequence
from rlflow.engines.config import SGLangConfig
from rlflow.transfer.lifetime import at_exit
from rlflow.transfer.lifetime import die_with_parent
from rlflow.engines.sglang_api import (SGLangClient, SGLangError, generate_request, parse_generation, parse_output,
                                       rids_for, update_group)


STREAM_POLL_S = 0.02  # rollout.update=in_flight: how often ``between`` runs while no request comes back


# ---------------------------------------------------------------------------- weight updates
def update_weights(client: SGLangClient, push, version: int, flush_timeout: float) -> None:
    """The update sequence of the module docstring around ``push()`` (the update call itself)."""
    client.pause()
    push()
    client.set_weight_version(version)
    client.flush_cache(flush_timeout)
    client.resume()
    require_version(client, version)


def require_version(client: SGLangClient, version: int) -> None:
    """The server must report ``version`` now, or the update is not trusted."""
    served = str(client.model_info().get("weight_version"))
    if served != str(version):
        raise SGLangError(f"after updating to version {version} the server reports weight_version {served!r}")


def write_snapshot(weights: dict[str, torch.Tensor], directory: Path, model_path: str) -> Path:
    """A loadable checkpoint directory: the weights as safetensors plus the start checkpoint's config files."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    for name in ("config.json", "generation_config.json"):
        if (Path(model_path) / name).exists():
            shutil.copy(Path(model_path) / name, directory / name)
    return directory


def tensor_buckets(weights: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Split ``weights`` into lists of at most ``bucket_bytes`` (a bigger tensor goes alone), in order."""
    buckets, current, size = [], [], 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


# ---------------------------------------------------------------------------- the engine
class SGLangEngine:
    """A RolloutEngine on one sglang server (launched here or reached at ``rollout.sglang.url``)."""

    def __init__(self, model_path: str, cfg, lora_cfg=None):
        from rlflow.engines.hf import stop_token_ids

        self.cfg: SGLangConfig = cfg.sglang
        self.lora = lora_cfg  # the run's actor.lora: versions are adapters on the server's base model
        self.adapter: str | None = None  # the loaded adapter every generate names (LoRA)
        self.loaded: list[str] = []  # the adapters this engine loaded on the server and has not unloaded
        self.model_path, self.dtype, self.seed, self.device = model_path, cfg.dtype, cfg.seed, cfg.device
        self.max_inflight = cfg.max_batch  # rollout.update=in_flight: sequences in flight on the server at once
        self.stop_ids = stop_token_ids(model_path)
        self.server: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.key_dir: str | None = None  # the launched server's private config file (its API key), until it is up
        self.api_key = server_key(self.cfg)
        url = self.cfg.url or self._launch()
        self.client = SGLangClient(url, self.api_key, self.cfg.request_timeout)
        try:
            self._wait_ready()
            if self.lora is not None and self.cfg.url is not None:  # launched servers get the flags themselves
                require_lora_server(self.client.server_info(), self.lora, self.client.url)
        finally:
            self._forget_key_file()
        self.version = 0
        self.installed: str | None = None  # the weight_version tag this engine set (None: the server's own)
        self.prefix = f"rlf{uuid.uuid4().hex[:8]}"
        self.calls = 0
        self.follows_trainer = self.cfg.update == "distributed"  # the trainer installs versions (WeightBroadcaster)
        self.update_root = Path(self.cfg.update_dir or tempfile.mkdtemp(
            prefix="rlflow-sglang-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self._snapshot: Path | None = None
        at_exit(self.close)  # a stopped replica leaves no server and no snapshot in memory

    # -------------------------------------------------------------- the interface
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, between=None,
                 finished=None) -> list[Generation | None]:
        """One batched request (with ``between``, rollout.update=in_flight: ``_stream``)."""
        if between is not None:
            return self._stream(prompts, sampling, between, finished)
        self._require_adapter()
        out: list[Generation | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(self.cfg.max_retries + 1):
            self.calls += 1
            rids = rids_for(self.prefix, self.calls, len(todo))
            items = self.client.generate(generate_request([prompts[i] for i in todo], sampling, self.stop_ids, rids,
                                                          self.adapter))
            if len(items) != len(todo):
                raise SGLangError(f"/generate returned {len(items)} results for {len(todo)} prompts")
            again = []
            for i, item in zip(todo, items):
                out[i] = parse_generation(item, self.installed)
                if out[i] is None:
                    again.append(i)
            if not again:
                return out  # type: ignore[return-value]
            todo = again
        raise SGLangError(f"the server aborted {len(todo)} sequences {self.cfg.max_retries + 1} times "
                          f"(rollout.sglang.max_retries): is another client pausing it?")

    def _stream(self, prompts: list[list[int]], sampling: SamplingParams, between, finished) -> list[Generation | None]:
        """rollout.update=in_flight on sglang: abort and resume (engines/base.py has the contract).

        Every sequence is a request of its own, up to ``max_inflight`` at once (sglang batches them
        continuously), so each is handed to ``finished`` as it ends. Between results ``between`` runs:
        a new version goes in by the usual sequence (``load_weights``: abort-mode pause, update, flush,
        continue), which returns every request in flight aborted, with what it had generated; each is
        sent again as its prompt and those tokens, for the tokens left, and runs on the new weights.
        No request spans an update, so each token's version is the weight version its request ran at
        (checked to be a version this engine installed), and its logprob is exactly that policy's (the
        server recomputes the prefix: the KV cache was flushed). A sequence aborted ``max_retries``
        times in a row with nothing generated fails the call, as in ``generate``."""
        from collections import deque
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        self._require_adapter()
        seqs: dict[int, Sequence] = {}
        idle: dict[int, int] = {}  # sequence -> aborts in a row that gave it no token
        queue: deque[int] = deque()
        count = 0

        def add(new) -> None:
            nonlocal count
            for p in new or ():
                seqs[count] = Sequence(p)
                queue.append(count)
                count += 1

        add(prompts)
        running: dict = {}  # future -> sequence
        pool = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="rlflow-sglang")
        try:
            while running or queue:
                while queue and len(running) < self.max_inflight:
                    i = queue.popleft()
                    s = seqs[i]
                    self.calls += 1
                    left = SamplingParams(sampling.max_new_tokens - len(s.tokens), sampling.temperature,
                                          sampling.top_p, sampling.top_k)
                    request = generate_request([s.prompt + s.tokens], left, self.stop_ids,
                                               rids_for(self.prefix, self.calls, 1), self.adapter)
                    running[pool.submit(self.client.generate, request)] = i
                done, _ = wait(list(running), timeout=STREAM_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    self._took(seqs[i], future.result(), idle, i, sampling.max_new_tokens)
                    if seqs[i].finish is None:
                        queue.appendleft(i)  # aborted: resumed from what it had generated
                    elif finished is not None:
                        finished(i, seqs.pop(i).generation())
                add(between(len(running) + len(queue)))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [seqs[i].generation() if i in seqs else None for i in range(count)]

    def _require_adapter(self) -> None:
        """With LoRA, refuse to generate while no adapter is in: the base alone is no version of the run's policy."""
        if self.lora is not None and self.adapter is None:
            raise SGLangError(f"no LoRA adapter is loaded on {self.client.url}: no version came yet, or the last "
                              f"update failed part-way")

    def _took(self, s: Sequence, items: list[dict], idle: dict, i: int, budget: int) -> None:
        """Add one request's result to its sequence (a finish, or an abort's partial output)."""
        if len(items) != 1:
            raise SGLangError(f"/generate returned {len(items)} results for 1 prompt")
        kind, ids, logprobs, served = parse_output(items[0])
        if ids and (not served.isdigit() or int(served) > self.version):
            raise SGLangError(f"/generate ran at weight version {served!r}, which this engine (at {self.version}) did "
                              f"not install: another client updated the server")
        for token, logprob in zip(ids, logprobs):
            s.add(token, logprob, int(served))
        if kind != "abort":
            s.finish = kind
        elif not ids:
            idle[i] = idle.get(i, 0) + 1
            if idle[i] > self.cfg.max_retries:
                raise SGLangError(f"the server aborted a sequence {idle[i]} times in a row before it generated a token "
                                  f"(rollout.sglang.max_retries): is another client pausing it?")
        else:
            idle.pop(i, None)
        if kind == "abort" and len(s.tokens) >= budget:
            s.finish = "length"  # aborted as its last token came

    def wait_version(self, need: int, timeout: float) -> None:
        """update=distributed: until the trainer has installed version >= ``need`` on the server (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            served = self.client.weight_version()
            if served.isdigit() and int(served) >= need:
                self.version = int(served)
                return
            if time.monotonic() > deadline:
                raise SGLangError(f"waited {timeout:.0f}s for the trainer to broadcast policy version {need} to "
                                  f"{self.client.url} (it serves {served!r}): is the actor alive?")
            time.sleep(0.1)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if self.follows_trainer:
            raise RuntimeError("rollout.sglang.update=distributed: the trainer installs weights, not the rollout")
        if self.lora is not None:
            self._load_adapter(weights, version)
        elif self.cfg.update == "disk":
            previous, target = self._snapshot, write_snapshot(weights, self.update_root / f"v{version}", self.model_path)
            update_weights(self.client, lambda: self.client.update_from_disk(str(target), version), version,
                           self.cfg.flush_timeout)
            self._snapshot = target
            if previous is not None and previous != target:
                shutil.rmtree(previous, ignore_errors=True)
        else:
            update_weights(self.client, lambda: self._push_tensors(weights, version), version, self.cfg.flush_timeout)
        self.version, self.installed = version, str(version)

    def _load_adapter(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """LoRA: install ``weights`` (the adapters) as ``version`` (the sequence in the module docstring)."""
        from rlflow.engines import lora

        previous, target = self._snapshot, self.update_root / f"lora-v{version}"
        lora.save_adapter(weights, self.lora, self.model_path, target)
        name = f"{self.prefix}-v{version}"
        self.adapter = None  # until the new one is in and tagged: generate refuses meanwhile
        if name in self.loaded:  # the same version again (a resync): sglang refuses a name it holds
            self.client.unload_lora_adapter(name)
            self.loaded.remove(name)
        self.client.load_lora_adapter(name, str(target))
        self.loaded.append(name)
        self.client.set_weight_version(version)
        for old in self.loaded[:-1]:
            self.client.unload_lora_adapter(old)
            self.loaded.remove(old)
        self.adapter, self._snapshot = name, target
        self.client.flush_cache(self.cfg.flush_timeout)  # no cached prefix of an older adapter serves again
        require_version(self.client, version)
        if previous is not None and previous != target:
            shutil.rmtree(previous, ignore_errors=True)

    def _push_tensors(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """update=tensor: GPU copies in buckets, handed over as CUDA IPC handles (sglang's serializer)."""
        try:
            from sglang.srt.utils import MultiprocessingSerializer
        except ImportError as e:
            raise SGLangError("rollout.sglang.update=tensor serializes with sglang's own code: install the "
                              "sglang extra in the rollout's environment, or use update=disk") from e
        buckets = tensor_buckets(weights, self.cfg.bucket_mb << 20)
        for k, bucket in enumerate(buckets):
            named = [(name, t.to("cuda", non_blocking=True)) for name, t in bucket]
            torch.cuda.synchronize()
            payload = MultiprocessingSerializer.serialize(named, output_str=True)
            self.client.update_from_tensor([payload] * self.cfg.tp_size, version, flush=k == len(buckets) - 1)

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
        if self.cfg.url is not None:  # a server we did not launch outlives us: leave it none of our adapters
            for name in list(self.loaded):
                try:
                    self.client.unload_lora_adapter(name)
                except SGLangError:  # the server may be gone already
                    pass
                self.loaded.remove(name)
            self.adapter = None
        if self._snapshot is not None:
            shutil.rmtree(self._snapshot, ignore_errors=True)
        if self.cfg.update_dir is None:
            shutil.rmtree(self.update_root, ignore_errors=True)
        self._forget_key_file()

    def _forget_key_file(self) -> None:
        """The server read its config file at start: the key need not stay on disk."""
        if self.key_dir is not None:
            shutil.rmtree(self.key_dir, ignore_errors=True)
            self.key_dir = None

    # -------------------------------------------------------------- the server
    def _launch(self) -> str:
        try:
            import sglang  # noqa: F401
        except ImportError:
            raise SGLangError("rollout.engine=sglang with no rollout.sglang.url launches an sglang server, but "
                              "sglang is not installed here: pip install 'rlflow[sglang]' on a GPU host, or give "
                              "rollout.sglang.url=http://HOST:PORT of a running server") from None
        port = self.cfg.port or _free_port(self.cfg.host)
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.cfg.host, "--port", str(port), "--tp-size", str(self.cfg.tp_size),
               "--dtype", self.dtype, "--random-seed", str(self.seed)]
        if self.device.startswith("cuda:"):  # rollout.device=cuda:N: the server's first GPU
            cmd += ["--base-gpu-id", self.device.split(":", 1)[1]]
        if self.cfg.mem_fraction is not None:
            cmd += ["--mem-fraction-static", str(self.cfg.mem_fraction)]
        if self.lora is not None:
            cmd += lora_launch_args(self.lora)
        launch_args = [str(a) for a in self.cfg.launch_args]
        self.key_dir = None if "--config" in launch_args or not reads_config_files() else tempfile.mkdtemp(
            prefix="rlflow-sglang-key-")
        cmd += server_key_args(self.api_key, self.key_dir) + launch_args
        env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")}
        log = tempfile.NamedTemporaryFile(prefix="rlflow-sglang-", suffix=".log", delete=False)
        self.log_path = log.name
        # Its own session, so close() stops its whole process tree; it dies with this process (pdeathsig).
        self.server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=_server_preexec)
        return f"http://{self.cfg.host}:{port}"

    def _wait_ready(self) -> None:
        """Until the server answers /get_server_info, bounded by startup_timeout; the error says why not."""
        start = time.monotonic()
        deadline, next_note = start + self.cfg.startup_timeout, start + 30.0
        while True:
            if self.server is not None and self.server.poll() is not None:
                raise SGLangError(f"the sglang server exited with code {self.server.returncode} while starting; "
                                  f"its log ({self.log_path}) ends:\n{_tail(self.log_path)}")
            try:
                self.client.server_info()
                return
            except SGLangError as e:
                if time.monotonic() > deadline:
                    where = f"; its log ({self.log_path}) ends:\n{_tail(self.log_path)}" if self.log_path else ""
                    raise SGLangError(f"no sglang server ready at {self.client.url} within "
                                      f"rollout.sglang.startup_timeout={self.cfg.startup_timeout:.0f}s ({e}){where}") from e
                if time.monotonic() > next_note:  # model loading takes minutes on big checkpoints: show it
                    print(f"waiting for the sglang server at {self.client.url} ({time.monotonic() - start:.0f}s of "
                          f"{self.cfg.startup_timeout:.0f}s)", flush=True)
                    next_note += 30.0
                time.sleep(2.0)


def lora_launch_args(cfg) -> list[str]:
    """The server arguments that let it load the run's adapters (``actor.lora``) after start-up."""
    return ["--enable-lora", "--max-lora-rank", str(cfg.rank), "--lora-target-modules", *cfg.target_modules]


def require_lora_server(info: dict, cfg, url: str) -> None:
    """A server at ``rollout.sglang.url`` must have been launched to take the run's adapters (its
    ``/get_server_info`` lists its arguments); an sglang that does not say is left to its first load."""
    if "enable_lora" not in info:
        return
    fix = f"launch it with {' '.join(lora_launch_args(cfg))}"
    if not info.get("enable_lora"):
        raise SGLangError(f"actor.lora.rank={cfg.rank}: the sglang server at {url} (rollout.sglang.url) was launched "
                          f"without LoRA: {fix}")
    rank, targets = info.get("max_lora_rank"), info.get("lora_target_modules")
    if rank is not None and int(rank) < cfg.rank:
        raise SGLangError(f"actor.lora.rank={cfg.rank}: the sglang server at {url} takes adapters of rank <= {rank} "
                          f"(--max-lora-rank): {fix}")
    if targets and "all" not in targets and not set(cfg.target_modules) <= set(targets):
        raise SGLangError(f"actor.lora.target_modules={list(cfg.target_modules)}: the sglang server at {url} applies "
                          f"adapters to {sorted(targets)} only (--lora-target-modules): {fix}")


def server_key(cfg: SGLangConfig) -> str | None:
    """The API key of the engine's server: the configured one; for a server it launches without one, a
    random key of its own (nobody else needs it); None for a server at ``url`` that takes none."""
    if cfg.api_key is not None or cfg.url is not None:
        return cfg.api_key
    import secrets

    return secrets.token_urlsafe(32)


def reads_config_files() -> bool:
    """Whether the installed sglang reads server arguments from a file (``--config``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("sglang.srt.server_args_config_parser") is not None
    except ImportError:
        return False


def server_key_args(api_key: str, key_dir: str | None) -> list[str]:
    """The arguments that give a launched server ``api_key``: a ``0600`` config file in ``key_dir`` (a
    private directory) when there is one, else the command line, which every local user can read."""
    if key_dir is None:
        print("warning: the sglang server gets its API key on its command line (this sglang reads no --config "
              "file, or rollout.sglang.launch_args has its own), where other local users can read it",
              file=sys.stderr, flush=True)
        return ["--api-key", api_key]
    path = os.path.join(key_dir, "server.yaml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"api-key: {json.dumps(api_key)}\n")  # a JSON string is a YAML string
    return ["--config", path]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: str | None, lines: int = 30) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- update=distributed: the trainer's side
class WeightBroadcaster:
    """update=distributed, on the trainer: every server joins one process group with the trainer as rank 0
    (a server's TP ranks take the ranks after it), and each new version is broadcast tensor by tensor.

    Per version: pause every server (abort), ask each to receive ``names/dtypes/shapes`` while this side
    broadcasts them in that order, tag the version, flush, continue. The servers' versions then move
    with the trainer's; rollout replicas read the version each sample was generated at from sglang's
    response (``Generation.version``), so the staleness bound still holds.
    """

    def __init__(self, urls: list[str], tp_sizes: list[int], host: str, backend: str, cfg: SGLangConfig,
                 timeout: float):
        from concurrent.futures import ThreadPoolExecutor

        self.cfg, self.backend = cfg, backend
        self.clients = [SGLangClient(u, cfg.api_key, cfg.request_timeout) for u in urls]
        for c in self.clients:
            c.server_info()
        self.name = f"rlflow-{uuid.uuid4().hex[:8]}"
        world = 1 + sum(tp_sizes)
        port = _free_port(host)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(urls))]
        self.pool = ThreadPoolExecutor(max(1, len(urls)), thread_name_prefix="rlflow-broadcast")
        joins = [self.pool.submit(c.init_update_group, host, port, off, world, self.name, backend)
                 for c, off in zip(self.clients, offsets)]
        self.group = update_group(backend, host, port, world, 0, self.name, timeout)
        for j in joins:
            j.result()

    def push(self, weights: dict[str, torch.Tensor], version: int, device: str) -> float:
        """Install ``weights`` as ``version`` on every server; returns the seconds it took."""
        import torch.distributed as dist

        t0 = time.monotonic()
        names = list(weights)
        dtypes = [str(weights[n].dtype).removeprefix("torch.") for n in names]
        shapes = [list(weights[n].shape) for n in names]
        for c in self.clients:
            c.pause()
        receives = [self.pool.submit(c.update_from_distributed, names, dtypes, shapes, self.name, version)
                    for c in self.clients]
        for n in names:
            dist.broadcast(weights[n].to(device).contiguous(), src=0, group=self.group)
        for r in receives:
            r.result()
        for c in self.clients:
            c.set_weight_version(version)
            c.flush_cache(self.cfg.flush_timeout)
            c.resume()
        return time.monotonic() - t0

    def close(self) -> None:
        import torch.distributed as dist

        self.pool.shutdown(wait=False)
        try:
            dist.destroy_process_group(self.group)
        except Exception:  # noqa: BLE001 - the servers may already be gone at shutdown
            pass


def _server_preexec() -> None:
    """In the server's process, before exec: SIGTERM unblocked (the rollout blocks it for the thread that
    waits for it, and a signal mask survives exec), then dying with the rollout (pdeathsig)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    die_with_parent()
