"""The tools a model may call: their definitions (OpenAI's function-tool shape, a JSON schema
of the arguments) and a runner that never raises.

`resolve("calculator,mymod:search")` gives `Tool`s: a built-in by name, or a user's function
named `module:function` (imported from the Python path), whose schema is read from its
signature (annotations to JSON types; parameters without a default are required) and its
docstring (the first paragraph describes the tool; an `Args:` section describes the
parameters). `run(tools, name, arguments)` calls one and returns its result as text: a tool
that raises, runs past its time limit, gets arguments that are not a JSON object or do
not fit its signature, or is not in `tools` gives an "error: ..." text the model reads as
the tool's result. Results are cut to `max_chars`.

Time limits: the call runs in a daemon thread that is abandoned when it runs late (Python
cannot stop a thread): a tool that hangs costs a thread, never the caller.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import threading
from typing import Any, Callable, Sequence, get_args, get_origin, get_type_hints

from lm.agent.calculator import calculator

TIMEOUT_S = 5.0  # seconds a tool call may take
MAX_CHARS = 2000  # characters of a tool's result the model sees


class ToolError(ValueError):
    """A tool that cannot be defined (an unknown name, a module or function that does not import)."""


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (an object)
    fn: Callable[..., Any] | None = None  # None: defined by a client, run by it (the server)

    def spec(self) -> dict:
        """The OpenAI tool definition: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
               tuple: "array"}


def _json_type(annotation) -> dict:
    if annotation is inspect.Parameter.empty:
        return {}
    origin = get_origin(annotation)
    if origin is not None and origin not in (list, dict, tuple):  # Optional[X], X | None: X's type
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _json_type(args[0]) if len(args) == 1 else {}
    base = origin or annotation
    return {"type": _JSON_TYPES[base]} if base in _JSON_TYPES else {}


def _docs(doc: str) -> tuple[str, dict[str, str]]:
    """(the description: the docstring's first paragraph, the `Args:` section's {name: text})."""
    doc = inspect.cleandoc(doc or "")
    description = " ".join(doc.split("\n\n")[0].split())
    args, current = {}, None
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)*)", doc, re.M)
    for line in (section.group(1).splitlines() if section else []):
        m = re.match(r"\s+(\w+)\s*(?:\([^)]*\))?:\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            args[current] = m.group(2).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    return description, args


def from_function(fn: Callable, name: str | None = None) -> Tool:
    """A tool from a Python function: its schema from the signature and the docstring."""
    description, arg_docs = _docs(fn.__doc__)
    try:  # annotations written as strings (`from __future__ import annotations`) resolved
        hints = get_type_hints(fn)
    except Exception:  # noqa: BLE001 -- a name that does not resolve: no type for it
        hints = {}
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        prop = _json_type(hints.get(p.name, inspect.Parameter.empty))
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        props[p.name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": props, "required": required}
    return Tool(name or fn.__name__, description or f"the function {fn.__name__}", schema, fn)


BUILTINS = {"calculator": lambda: from_function(calculator)}


def resolve(names: str | Sequence[str]) -> list[Tool]:
    """Tools from "calculator,mymod:search" (or a list of such names)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    tools = []
    for name in names:
        if name in BUILTINS:
            tools.append(BUILTINS[name]())
            continue
        module, sep, attr = name.partition(":")
        if not sep or not module or not attr:
            raise ToolError(f"tool {name!r}: a built-in ({', '.join(BUILTINS)}) or a function as module:function")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ToolError(f"tool {name!r}: cannot import {module!r} ({e})") from None
        except AttributeError:
            raise ToolError(f"tool {name!r}: module {module!r} has no {attr!r}") from None
        if not callable(fn):
            raise ToolError(f"tool {name!r}: {module}.{attr} is not a function")
        tools.append(from_function(fn))
    seen = set()
    for t in tools:
        if t.name in seen:
            raise ToolError(f"two tools are named {t.name!r}")
        seen.add(t.name)
    return tools


def cap(text: str, max_chars: int = MAX_CHARS) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + f"... [cut: {len(text) - max_chars} more characters]"


def run(tools: Sequence[Tool], name: str, arguments: str | dict, timeout: float = TIMEOUT_S,
        max_chars: int = MAX_CHARS) -> str:
    """Call tool `name` with `arguments` (a JSON object, as text or parsed): its result as text
    (JSON for what is not a string), or "error: ..." (never raises)."""
    by_name = {t.name: t for t in tools}
    if name not in by_name or by_name[name].fn is None:
        return f"error: unknown tool {name!r} (tools: {', '.join(by_name) or 'none'})"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return cap(f"error: the arguments are not valid JSON ({e.msg} at character {e.pos})", max_chars)
    if not isinstance(arguments, dict):
        return f"error: the arguments must be a JSON object, not {type(arguments).__name__}"
    fn = by_name[name].fn
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return cap(f"error: {e}", max_chars)
    box: dict = {}

    def call():
        try:
            box["result"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 -- whatever a tool raises is its result
            box["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

    thread = threading.Thread(target=call, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"error: the tool did not finish within {timeout:g} s"
    if "error" in box:
        return cap(f"error: {box['error']}", max_chars)
    result = box.get("result")
    if not isinstance(result, str):
        try:
            result = json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError) as e:
            return f"error: the tool's result cannot be written as JSON ({e})"
    return cap(result, max_chars)
