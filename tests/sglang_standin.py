"""A stand-in for an sglang server, for the tests of a machine where sglang cannot run (no GPU).

It speaks the part of sglang's HTTP API that ``engines/sglang.py`` uses, with the request and
response shapes of sglang 0.5.x's own server (``http_server.py`` / ``io_struct.py``): batched ``/generate``
on ``input_ids`` with ``meta_info.output_token_logprobs`` as [logprob, token_id, text] triples and
``finish_reason`` objects; abort-mode ``/pause_generation``; ``/update_weights_from_disk``
answering {success, message, num_paused_requests}; ``/update_weight_version``; a plain-text
``/flush_cache`` answering 400 while busy; ``/get_server_info`` and ``/get_model_info``; with ``lora``
(as ``--enable-lora --max-lora-rank R --lora-target-modules ...``, which ``/get_server_info`` lists)
``/load_lora_adapter`` and ``/unload_lora_adapter`` of peft's adapter files, answering {success,
error_message, loaded_adapters}, refusing a name already loaded, an unknown one, or an adapter beyond
the launch flags; each adapter applies with its own file's r and lora_alpha, as sglang's does;
``lora_path`` on ``/generate`` names a loaded adapter (none: the base model).
With ``token_s`` > 0 a generation takes that long per token after it is computed (the decode a real
server spends), and an abort-mode pause cuts every one in flight: it comes back aborted with the tokens
"decoded" so far (as sglang returns a running request's partial output), and the pause returns once
none is left, as sglang's does.
Behind it is a real model (the tiny checkpoint on torch), so generations and weight updates are real.
It is strict where sglang is: unknown sampling parameters, top_k 0, duplicate rids and a batch whose rid
list has the wrong length are 400s. Faults can be injected (``flush_busy``, ``abort_next``).

Every call is recorded in ``calls`` as (path, body) so a test can check the engine's sequencing.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
                 "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n", "min_new_tokens",
                 "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "json_schema", "regex",
                 "sampling_seed"}


class StandIn:
    def __init__(self, model_path: str, version: str = "0.5.10", seed: int = 0, lora=None, token_s: float = 0.0):
        from rlflow.roles.config import RolloutConfig

        from rlflow.engines.hf import HFRolloutEngine

        self.model_path, self.server_version, self.lora = model_path, version, lora
        self.engine = HFRolloutEngine(model_path, RolloutConfig(device="cpu", dtype="float32", max_batch=256, seed=seed),
                                      lora)
        self.adapters: dict[str, tuple] = {}  # loaded LoRA adapters by name: (their file's config, tensors)
        self.lora_engines: dict = {}  # an engine wrapped as each adapter config asks (r, alpha, targets)
        self.fail_lora_load = False  # the next /load_lora_adapter answers success false
        self.generated_with: dict | None = None  # the adapter tensors the last /generate ran with
        self.weight_version = "default"
        self.lock = threading.Lock()  # one model: requests take turns
        self.resumed = threading.Event()
        self.resumed.set()
        self.token_s = token_s  # seconds of decoding per token, after the tokens are computed (0: none)
        self.aborting = threading.Event()  # an abort-mode pause: generations in flight come back cut
        self.decoding = 0  # generations in flight (being paced), under ``idle``
        self.idle = threading.Condition()
        self.calls: list[tuple[str, dict | None]] = []
        self.flush_busy = 0  # the next N flushes answer 400 (scheduler not idle)
        self.abort_next = 0  # the next generate aborts its first N sequences
        self.fail_update = False  # the next disk update answers success false
        self.generated_versions: list[str] = []
        self.inputs: list[list[int]] = []  # every sequence generate was given, in order
        self.api_key: str | None = None  # as sglang's --api-key: every call needs "Authorization: Bearer <key>"
        self.unauthorized = 0  # calls refused for want of it
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]

    # ---------------------------------------------------------------- endpoints: (status, body)
    def handle(self, method: str, path: str, body):
        path = path.split("?")[0]
        self.calls.append((path, body))
        if path == "/get_server_info":
            lora = {"enable_lora": self.lora is not None, "max_lora_rank": getattr(self.lora, "rank", None),
                    "lora_target_modules": list(self.lora.target_modules) if self.lora is not None else None}
            return 200, {"version": self.server_version, "model_path": self.model_path, "tp_size": 1,
                         "weight_version": "default", **lora}
        if path in ("/get_model_info", "/model_info"):
            return 200, {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": self.weight_version}
        if path == "/generate":
            return self.generate(body)
        if path == "/pause_generation":
            if body.get("mode", "abort") not in ("abort", "retract", "in_place"):
                return 400, {"error": {"message": f"bad mode {body.get('mode')}"}}
            self.resumed.clear()
            if body.get("mode", "abort") == "abort":
                self.aborting.set()
                with self.idle:
                    self.idle.wait_for(lambda: self.decoding == 0, timeout=30)
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/continue_generation":
            self.aborting.clear()
            self.resumed.set()
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path == "/update_weights_from_disk":
            return self.update_from_disk(body)
        if path == "/load_lora_adapter":
            return self.load_adapter(body)
        if path == "/unload_lora_adapter":
            if body.get("lora_name") not in self.adapters:
                return 400, {"success": False, "error_message": f"LoRA adapter {body.get('lora_name')} is not loaded"}
            del self.adapters[body["lora_name"]]
            return 200, {"success": True, "error_message": "", "loaded_adapters": sorted(self.adapters)}
        if path == "/init_weights_update_group":
            return self.join_group(body)
        if path == "/update_weights_from_distributed":
            return self.update_from_distributed(body)
        if path == "/update_weight_version":
            self.weight_version = body["new_version"]
            return 200, {"success": True, "message": "Weight version updated", "new_version": self.weight_version}
        if path == "/flush_cache":
            if self.flush_busy > 0:
                self.flush_busy -= 1
                return 400, "Flush cache failed.\n"
            return 200, "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n"
        return 404, {"detail": "Not Found"}

    def generate(self, body):
        from rlflow.engines.base import SamplingParams

        ids = body.get("input_ids")
        sp = body.get("sampling_params") or {}
        unknown = set(sp) - SAMPLING_KEYS
        if unknown:
            return 400, {"error": f"unknown sampling parameters {sorted(unknown)}"}
        if sp.get("top_k", -1) == 0:
            return 400, {"error": {"message": "top_k must be -1 (disable), or at least 1, got 0."}}
        if not ids or not isinstance(ids[0], list):
            return 400, {"error": {"message": "this stand-in serves batched input_ids only"}}
        rids = body.get("rid")
        if isinstance(rids, list) and (len(rids) != len(ids) or len(set(rids)) != len(rids)):
            return 400, {"error": {"message": "rid list must have one distinct rid per item"}}
        if not self.resumed.wait(60):  # sglang holds new requests while paused
            return 503, {"error": {"message": "paused for 60s"}}
        top_k = sp.get("top_k", -1)
        sampling = SamplingParams(sp.get("max_new_tokens", 128), sp.get("temperature", 1.0), sp.get("top_p", 1.0),
                                  0 if top_k == -1 else top_k)
        adapter = body.get("lora_path")
        if adapter is not None and adapter not in self.adapters:
            return 400, {"error": {"message": f"LoRA adapter {adapter!r} is not loaded"}}
        with self.lock:
            if adapter is not None:
                from rlflow.engines.hf import load_parameters

                config, tensors = self.adapters[adapter]
                self.generated_with = tensors  # the adapter the last generate ran with
                engine = self._lora_engine(config)
                load_parameters(engine.model, tensors)
                engine.gen = self.engine.gen  # one sampling stream, whichever adapter runs
                gens = engine.generate(ids, sampling)
            elif self.lora is not None:  # no adapter named: the base model
                with self.engine.model.disable_adapter():
                    gens = self.engine.generate(ids, sampling)
            else:
                gens = self.engine.generate(ids, sampling)
            version = self.weight_version
            with self.idle:
                self.decoding += 1
        cut = self._decode(max(len(g.response_ids) for g in gens))
        self.generated_versions.append(version)
        self.inputs += ids
        out = []
        for i, (prompt, g) in enumerate(zip(ids, gens)):
            rid = rids[i] if isinstance(rids, list) else f"r{i}"
            if i < self.abort_next:
                out.append({"text": "", "output_ids": [], "meta_info": {
                    "id": rid, "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                    "completion_tokens": 0, "output_token_logprobs": []}})
                continue
            if cut is not None and cut < len(g.response_ids):  # aborted while decoding: what it had so far
                out.append({"text": "", "output_ids": g.response_ids[:cut], "meta_info": {
                    "id": rid, "finish_reason": {"type": "abort", "message": "Abort before prefill"},
                    "prompt_tokens": len(prompt), "completion_tokens": cut, "weight_version": version,
                    "output_token_logprobs": [[lp, t, None] for lp, t in zip(g.logprobs[:cut], g.response_ids[:cut])]}})
                continue
            reason = ({"type": "stop", "matched": g.response_ids[-1]} if g.finish_reason == "stop"
                      else {"type": "length", "length": len(g.response_ids)})
            out.append({"text": "", "output_ids": g.response_ids, "meta_info": {
                "id": rid, "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(g.response_ids), "cached_tokens": 0, "weight_version": version,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(g.logprobs, g.response_ids)],
                "input_token_logprobs": [[None, prompt[-1], None]]}})
        self.abort_next = 0
        return 200, out

    def _decode(self, longest: int) -> int | None:
        """Pace a generation (``token_s`` per token); the token an abort-mode pause cut it at, or None."""
        try:
            for k in range(longest if self.token_s > 0 else 0):
                if self.aborting.is_set():
                    return k
                time.sleep(self.token_s)
            return None
        finally:
            with self.idle:
                self.decoding -= 1
                self.idle.notify_all()

    def join_group(self, body):
        """sglang's side of the trainer's group: rank = rank_offset + tp_rank (one TP rank here)."""
        from rlflow.engines.sglang_api import update_group  # sglang's init_custom_process_group, as the trainer uses it

        self.group = update_group(body.get("backend") or "nccl", body["master_address"], body["master_port"],
                                  body["world_size"], body["rank_offset"], body["group_name"], 60)
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_from_distributed(self, body):
        """Receive each named tensor by broadcast from rank 0, in the request's order, then load them all."""
        import torch
        import torch.distributed as dist

        from rlflow.engines.hf import load_parameters

        received = {}
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(t, src=0, group=self.group)
            received[name] = t
        with self.lock:
            load_parameters(self.engine.model, received)
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def load_adapter(self, body):
        """sglang checks an adapter against what the server was launched with: rank and target modules."""
        from rlflow.engines import lora

        if self.lora is None:
            return 400, {"success": False, "error_message": "LoRA is not enabled. Please set `--enable-lora`."}
        if body.get("lora_name") in self.adapters:
            return 400, {"success": False, "error_message": f"The LoRA adapter {body['lora_name']} is already loaded."}
        if self.fail_lora_load:
            self.fail_lora_load = False
            return 400, {"success": False, "error_message": "Failed to load LoRA adapter: injected fault"}
        path = Path(body["lora_path"])
        try:
            config, tensors = lora.read_config(path), lora.load_adapter(path)
        except (OSError, ValueError) as e:
            return 400, {"success": False, "error_message": f"Failed to load LoRA adapter: {e}"}
        if config.rank > self.lora.rank or not set(config.target_modules) <= set(self.lora.target_modules):
            return 400, {"success": False, "error_message": "LoRA adapter exceeds --max-lora-rank or --lora-target-modules"}
        self.adapters[body["lora_name"]] = (config, tensors)
        return 200, {"success": True, "error_message": "", "loaded_adapters": sorted(self.adapters)}

    def _lora_engine(self, config):
        """The base wrapped as an adapter's own file says (its r, lora_alpha and target modules)."""
        from rlflow.roles.config import RolloutConfig

        from rlflow.engines.hf import HFRolloutEngine

        key = (config.rank, config.alpha, tuple(config.target_modules))
        if key not in self.lora_engines:
            self.lora_engines[key] = HFRolloutEngine(self.model_path, RolloutConfig(device="cpu", dtype="float32", max_batch=256, seed=0), config)
        return self.lora_engines[key]

    def update_from_disk(self, body):
        from safetensors.torch import load_file

        from rlflow.engines.hf import load_parameters

        path = Path(body["model_path"])
        if self.fail_update or not (path / "model.safetensors").exists():
            self.fail_update = False
            return 400, {"success": False, "message": f"Failed to update weights: no checkpoint at {path}",
                         "num_paused_requests": 0}
        with self.lock:
            load_parameters(self.engine.model, load_file(str(path / "model.safetensors")))
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}


def _handler(standin: StandIn):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if standin.api_key is not None and self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                standin.unauthorized += 1
                status, payload = 401, {"error": "Unauthorized"}
            else:
                status, payload = standin.handle(method, self.path, body if body is not None else {})
            raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, *args):
            pass

    return Handler
