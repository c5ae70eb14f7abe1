"""Tools as plain functions, and the built-in environment that lets the model call them.

    from rlflow.envs.tools import tool

    @tool
    def calc(expression: str) -> str:
        '''Evaluate an arithmetic expression.'''

    # recipe: env.cls=rlflow.envs.tools.ToolEnv env.kwargs.tools=[my_pkg.calc] env.kwargs.format=call

``ToolEnv`` reads each model turn: a tool call runs the tool and its result (or the error) is the
observation; a turn that is no tool call is the episode's answer and ends it (the final reward function,
``reward.fn``, scores that turn's text). A malformed call, an unknown tool or a tool that raises gets an
observation saying so and the episode goes on: the model can repair its call, and nothing crashes.

Call formats (``format``, plain functions in ``FORMATS``):
- ``call``: the whole turn is ``name(argument text)``; the tool gets the argument text as one string.
  Short, for small models (``calc(37*48)``).
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` anywhere in the turn, as
  instruct checkpoints (Qwen, Hermes) write them; the tool gets the arguments as keywords.

Counters each step reports (``info``): ``tool_call`` (a call that ran), ``malformed_call`` (a call that
could not be run: bad syntax, unknown tool, wrong arguments), ``tool_error`` (the tool raised).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Callable

from rlflow.plugins import load_object

TOOL_ATTR = "__rlflow_tool__"


def tool(fn: Callable | None = None, *, name: str | None = None):
    """Mark ``fn`` as a tool named ``name`` (default: its own name); it stays a plain function."""
    def mark(f: Callable) -> Callable:
        setattr(f, TOOL_ATTR, name or f.__name__)
        return f

    return mark(fn) if fn is not None else mark


class Malformed(ValueError):
    """A turn that tries to call a tool but cannot be run; the message becomes the observation."""


_CALL_START = re.compile(r"^\s*([A-Za-z_]\w*)\s*\(")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.DOTALL)
_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def parse_call(text: str) -> tuple[str, tuple, dict] | None:
    """``name(argument text)`` -> (name, (argument text,), {}); None when the turn is no call."""
    if not _CALL_START.match(text):
        return None
    m = _CALL.match(text)
    if m is None:
        raise Malformed("a call must be the whole turn: name(arguments), with its closing parenthesis")
    return m.group(1), (m.group(2).strip(),), {}


def parse_hermes(text: str) -> tuple[str, tuple, dict] | None:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` -> (name, (), arguments)."""
    m = _HERMES.search(text)
    if m is None:
        return None
    if not m.group(2):
        raise Malformed("<tool_call> is not closed with </tool_call>")
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        raise Malformed(f"the tool call is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise Malformed('a tool call is {"name": "...", "arguments": {...}}')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise Malformed('"arguments" must be a JSON object of the tool\'s parameters')
    return call["name"], (), arguments


FORMATS = {"call": parse_call, "hermes": parse_hermes}
RESULTS = {"call": " -> {result}\n", "hermes": "<tool_response>\n{result}\n</tool_response>\n"}


class ToolEnv:
    """The built-in tool environment (see the module docstring)."""

    def __init__(self, tools: list, format: str = "call", observation: str | None = None, max_result_chars: int = 512):
        """``tools``: functions or their dotted paths; ``observation``: how a result is shown, with
        ``{result}`` (default per format); ``max_result_chars``: longer results are cut."""
        if format not in FORMATS:
            raise ValueError(f"env.kwargs.format={format!r}: choose one of {sorted(FORMATS)}")
        if not tools:
            raise ValueError("env.kwargs.tools is empty: give the dotted paths of the tool functions")
        self.parse, self.template = FORMATS[format], observation or RESULTS[format]
        self.max_result_chars = max_result_chars
        self.tools: dict[str, Callable] = {}
        for t in tools:
            fn = load_object(t, "env.kwargs.tools") if isinstance(t, str) else t
            if not callable(fn):
                raise ValueError(f"env.kwargs.tools: {t!r} is not a function")
            self.tools[getattr(fn, TOOL_ATTR, fn.__name__)] = fn

    def reset(self, record: dict) -> None:
        return None

    def step(self, action: str):
        try:
            call = self.parse(action)
        except Malformed as e:
            return self._show(f"error: {e}"), 0.0, False, {"malformed_call": 1}
        if call is None:  # no call: this turn is the answer
            return None, 0.0, True, {}
        name, args, kwargs = call
        if name not in self.tools:
            return self._show(f"error: unknown tool {name!r}; the tools are {', '.join(sorted(self.tools))}"), \
                0.0, False, {"malformed_call": 1}
        try:
            result = self.tools[name](*args, **kwargs)
        except TypeError as e:  # wrong arguments for the tool's signature (or a TypeError inside it)
            return self._show(f"error: {name}: {e}"), 0.0, False, {"malformed_call": 1}
        except Exception as e:  # noqa: BLE001 - a tool's failure is shown to the model, never raised
            return self._show(f"error: {type(e).__name__}: {e}"), 0.0, False, {"tool_error": 1}
        return self._show(str(result)), 0.0, False, {"tool_call": 1}

    def _show(self, result: str) -> str:
        return self.template.format(result=result[: self.max_result_chars])


# ------------------------------------------------------------------------------ a built-in tool
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 100  # a result longer than this is refused (2**10**9 would take the worker's memory)


@tool
def calc(expression: str) -> str:
    """Evaluate an arithmetic expression of integers and + - * / // % and parentheses (no names, no
    powers: nothing but arithmetic is evaluated)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](value(node.left), value(node.right))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](value(node.operand))
        else:
            raise ValueError(f"only numbers and + - * / // % ( ) are allowed, not {ast.dump(node)[:40]}")
        if abs(out) >= 10 ** MAX_DIGITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return out

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression.strip()[:40]!r} as arithmetic") from None
    result = value(tree.body)
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"
