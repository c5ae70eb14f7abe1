"""Any agent code: an OpenAI-compatible chat-completions endpoint whose every completion is our engine's.

With ``env.agent=my_pkg.run_agent`` (instead of ``env.cls``) an episode is a user's agent function,
unchanged, run in an environment worker (``envs/worker.py``) with the prompt record, a base URL and
``env.kwargs``::

    async def run_agent(record: dict, base_url: str, **kwargs) -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
        reply = await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": record["prompt"]}])
        ...                                   # tools, more calls: any code
        return reward                         # or (reward, {"counter": n}); a plain def works too

Each chat call is one model turn of the episode. The endpoint relays the request to the rollout
replica over the worker's socket (where an environment's observation would go), the replica appends
to the episode's token stream the tokens of only the messages that are new since its last reply,
generates the turn with its engine, keeps the sampled tokens, logprobs and version, and sends back the
completion (where an environment's action would come). Nothing the model produced is re-tokenized: a
call whose messages do not extend the conversation the replica knows (history edited, a retried
call) starts a new segment instead (``roles/turns.py``).

Design decisions:
- The endpoint runs in the worker, beside the agent, on 127.0.0.1, with a per-episode secret in its
  path (``http://127.0.0.1:PORT/<secret>/v1``): the agent's traffic never leaves its host, only the
  running episode's agent can generate, and a call from an episode that is over gets a 404. The
  replica is reached only through the pool's authenticated socket, as for any environment.
- Calls are served one at a time, in arrival order: each is one turn of the one trajectory.
- The sampling is the recipe's (``rollout.temperature``, ``top_p``, ``max_new_tokens``): the policy that
  trains must be the one that sampled, so ``temperature``, ``top_p`` and ``seed`` in a request are
  ignored. ``max_tokens`` and ``stop`` are honoured by cutting the turn: after that many tokens, or
  after the first tokens whose text holds a stop string (the content ends before it). The tokens kept
  are a prefix of what was sampled, so training on them is exact, as if the engine had stopped there.
  What cannot be honoured is refused with a 400 that names the field: ``stream``, ``n`` > 1,
  ``top_logprobs``, non-text content.
- Each choice carries ``token_ids`` (an extension field: the ids sampled, as they are trained) and the
  completion's ``system_fingerprint`` names the policy version that sampled it (``rlflow-v<version>``).
- With ``tools`` in a request (and a chat template), the tools go to the template and
  ``<tool_call>{json}</tool_call>`` blocks in the model's turn come back as ``tool_calls``.
- A call past ``env.max_turns`` is refused (400, code ``max_turns``), and so is one longer than
  ``env.max_context_tokens`` (code ``context_length_exceeded``): the episode ends (finish_reason
  ``max_turns``, ``max_context``) with the reward the agent returns (0 if it raises instead).
- The agent's failures are its episode's alone, as an environment's: it raises -> ``env_error``; it
  neither calls nor returns within ``env.step_timeout_s`` -> ``env_timeout`` (the worker is killed).
"""

from __future__ import annotations

import hmac
import json
import queue
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlflow.envs.base import check_agent_result, run

ROLES = ("system", "developer", "user", "assistant", "tool")
MODEL = "policy"  # the one model the endpoint lists; any name is accepted in a request
MAX_BODY_BYTES = 8 << 20  # one request: the whole conversation so far (the pool's messages are 16 MiB)
MAX_PENDING_CALLS = 32  # calls of one agent waiting at once (more get 429): each holds a server thread
COMPLETION_WAIT_S = 3600.0  # bound on a call waiting for its turn; the pool's step timeout ends a stuck episode first
CLOSE_WAIT_S = 1.0  # how long a closed episode's agent gets to return before its worker is recycled
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class BadRequest(ValueError):
    """A request the endpoint refuses (400), with the field it names."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------ requests, checked
def chat_request(body) -> dict:
    """A chat-completions request, checked and in normal form: ``{"messages", "tools", "logprobs"}``.

    The normal form is what the replica compares between calls and renders, and it is a fixed point
    (the replica checks the worker's relay with this same function)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported: call without streaming", "stream")
    if body.get("n", 1) not in (1, None):
        raise BadRequest(f"n={body['n']!r}: each call is one turn of the episode, n must be 1", "n")
    if body.get("top_logprobs"):
        raise BadRequest("top_logprobs is not supported (logprobs=true gives each sampled token's)", "top_logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise BadRequest("tools must be a list of tool objects ({type: function, function: {...}})", "tools")
    stop = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"{key} must be a positive integer, got {max_tokens!r}", key)
    return {"messages": [_message(m, f"messages[{i}]") for i, m in enumerate(messages)], "tools": tools or None,
            "logprobs": bool(body.get("logprobs")), "stop": stop or None, "max_tokens": max_tokens}


def _message(m, at: str) -> dict:
    """One message in normal form: role, content as text ("" for none), tool_calls when there are any,
    tool_call_id and name when given. Other keys (refusal, annotations, ...) are dropped."""
    if not isinstance(m, dict):
        raise BadRequest(f"{at} must be an object with role and content", at)
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{at}.role")
    out = {"role": role, "content": _text(m.get("content"), f"{at}.content")}
    calls = m.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise BadRequest(f"{at}.tool_calls: only an assistant message has tool_calls, as a list", f"{at}.tool_calls")
        out["tool_calls"] = [_tool_call(c, f"{at}.tool_calls[{k}]") for k, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise BadRequest(f"{at}.{key} must be a string", f"{at}.{key}")
            out[key] = m[key]
    return out


def _text(content, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BadRequest(f"{at}[{j}]: only text parts ({{type: text, text: ...}}) are supported", f"{at}[{j}]")
            parts.append(p["text"])
        return "".join(parts)
    raise BadRequest(f"{at} must be a string, null or a list of text parts", at)


def _tool_call(c, at: str) -> dict:
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments", ""), str):
        raise BadRequest(f"{at} must be {{id, type: function, function: {{name, arguments: JSON text}}}}", at)
    return {"id": str(c.get("id") or ""), "type": "function",
            "function": {"name": f["name"], "arguments": f.get("arguments", "")}}


# ------------------------------------------------------------------------------ replies
def assistant_message(text: str, tools: bool, call_prefix: str) -> dict:
    """The model's turn as the assistant message the agent gets, in normal form. With ``tools``, each
    ``<tool_call>{"name", "arguments"}</tool_call>`` block that parses becomes a tool call (ids
    ``call_prefix`` + index) and leaves the content; a block that does not parse stays as written."""
    if not tools:
        return {"role": "assistant", "content": text}
    calls = []

    def take(m: re.Match) -> str:
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            return m.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return m.group(0)
        calls.append({"id": f"{call_prefix}{len(calls)}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
        return ""

    content = _TOOL_CALL.sub(take, text).strip() if "<tool_call>" in text else text
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


def completion_body(c: dict, call: int) -> dict:
    """The chat.completion object for the replica's completion ``c`` (``roles/episodes.py``)."""
    message = dict(c["message"])
    if message.get("tool_calls") and not message["content"]:
        message["content"] = None  # OpenAI's form for a turn that only calls tools
    return {"id": f"chatcmpl-rlflow-{call}", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL, "system_fingerprint": f"rlflow-v{c['version']}",  # the policy version that sampled it
            "choices": [{"index": 0, "message": message, "finish_reason": c["finish_reason"],
                         "logprobs": {"content": c["logprobs"]} if c.get("logprobs") is not None else None,
                         "token_ids": c["token_ids"]}],  # an extension: the sampled ids, exactly as trained
            "usage": {"prompt_tokens": c["prompt_tokens"], "completion_tokens": c["completion_tokens"],
                      "total_tokens": c["prompt_tokens"] + c["completion_tokens"]}}


def error_body(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


# ------------------------------------------------------------------------------ the worker's side
class _Call:
    """One chat call waiting for its completion: the handler thread blocks on ``reply``."""

    def __init__(self, secret: str, request: dict):
        self.secret, self.request = secret, request
        self.reply: queue.Queue[tuple[int, dict]] = queue.Queue(maxsize=1)


class AgentEndpoint:
    """An environment worker's agent host: the chat endpoint, and the agent of the running episode.

    The worker drives it as it drives an environment: ``start(record)`` and ``answer(completion)`` each
    return the agent's next event as the worker's reply (a call: ``{"request": ...}``; the agent's end:
    ``{"reward", "done": True, "info"}``); the agent raising raises here. ``close()`` ends the episode."""

    def __init__(self, fn, kwargs: dict, name: str):
        self.fn, self.kwargs, self.name = fn, kwargs, name
        self.events: queue.Queue = queue.Queue()  # (kind, secret, value); at most MAX_PENDING_CALLS calls + 1 end
        self.slots = threading.BoundedSemaphore(MAX_PENDING_CALLS)
        self.secret: str | None = None  # the running episode's; None between episodes
        self.thread: threading.Thread | None = None
        self.pending: _Call | None = None  # the call the replica is generating for
        self.calls, self.refused = 0, False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="rlflow-agent-endpoint", daemon=True).start()

    def base_url(self, secret: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{secret}/v1"

    def start(self, record: dict) -> dict:
        self.secret, self.calls, self.refused = secrets.token_urlsafe(24), 0, False
        self.thread = threading.Thread(target=self._run, args=(self.secret, record), name="rlflow-agent", daemon=True)
        self.thread.start()
        return self._next()

    def answer(self, completion: dict) -> dict:
        call, self.pending = self.pending, None
        if call is None:
            raise RuntimeError("a completion came, but no call of this episode's agent waits for one: a bug in the pool")
        if "refused" in completion:
            self.refused = True
            call.reply.put((400, error_body(completion["refused"], code=completion.get("code"))))
        else:
            self.calls += 1
            call.reply.put((200, completion_body(completion, self.calls)))
        return self._next()

    def close(self) -> bool:
        """End the episode: its URL stops working and waiting calls get a 404. True when its agent has
        returned (within ``CLOSE_WAIT_S``); False: it is still running, and the worker must be recycled."""
        self.secret = None
        if self.pending is not None:
            self.pending.reply.put((404, error_body("the episode is over")))
            self.pending = None
        self._drain()
        if self.thread is not None:
            self.thread.join(CLOSE_WAIT_S)
            if self.thread.is_alive():
                return False
            self.thread = None
        return True

    def _run(self, secret: str, record: dict) -> None:
        try:
            value = run(self.fn(record, self.base_url(secret), **self.kwargs))
            self.events.put(("end", secret, value))
        except BaseException as e:  # noqa: BLE001 - the agent is user code: its failure ends its episode
            self.events.put(("raised", secret, e))

    def _next(self) -> dict:
        """The running agent's next event. Unbounded here by design: the pool bounds every call, and
        kills this process past ``env.step_timeout_s``."""
        while True:
            kind, secret, value = self.events.get()
            if secret != self.secret:  # from an episode that is over
                if kind == "call":
                    value.reply.put((404, error_body("the episode is over")))
                continue
            if kind == "call":
                self.pending = value
                return {"request": value.request}
            if kind == "raised" and self.refused:  # it gave up after its call past env.max_turns was refused
                return {"reward": 0.0, "done": True, "info": {}}
            if kind == "raised":
                raise value
            step = check_agent_result(value, self.name)
            return {"reward": step.reward, "done": True, "info": step.info}

    def _drain(self) -> None:
        while True:
            try:
                kind, _, value = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                value.reply.put((404, error_body("the episode is over")))


def _handler(endpoint: AgentEndpoint):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the run's logs are the replica's, not a line per call
            pass

        def _route(self) -> str | None:
            """The path after a valid episode secret (``v1/...``), or None (answered 404)."""
            _, secret, rest = (self.path.split("?")[0].split("/", 2) + ["", ""])[:3]
            current = endpoint.secret
            if current is None or not hmac.compare_digest(secret.encode(), current.encode()):
                self._send(404, error_body("no such episode: this URL is from an episode that is over, or wrong"))
                return None
            return rest

        def do_GET(self) -> None:
            if (rest := self._route()) is None:
                return
            if rest.rstrip("/") == "v1/models":
                self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "rlflow"}]})
            else:
                self._send(404, error_body(f"no route GET /{rest}: the endpoint serves POST /v1/chat/completions"))

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                self._send(413 if length > 0 else 400,
                           error_body(f"Content-Length must be 0 to {MAX_BODY_BYTES} bytes, got {self.headers.get('Content-Length')!r}"))
                return
            body = self.rfile.read(length)
            if (rest := self._route()) is None:
                return
            if rest.rstrip("/") != "v1/chat/completions":
                self._send(404, error_body(f"no route POST /{rest}: the endpoint serves POST /v1/chat/completions"))
                return
            try:
                request = chat_request(json.loads(body or b"null"))
            except json.JSONDecodeError as e:
                self._send(400, error_body(f"the body is not JSON: {e}"))
                return
            except BadRequest as e:
                self._send(400, error_body(str(e), e.param))
                return
            if not endpoint.slots.acquire(blocking=False):
                self._send(429, error_body(f"more than {MAX_PENDING_CALLS} calls of this agent at once"))
                return
            try:
                call = _Call(endpoint.secret or "", request)
                endpoint.events.put(("call", call.secret, call))
                try:
                    status, reply = call.reply.get(timeout=COMPLETION_WAIT_S)
                except queue.Empty:
                    status, reply = 504, error_body(f"no completion within {COMPLETION_WAIT_S:g}s")
            finally:
                endpoint.slots.release()
            self._send(status, reply)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
