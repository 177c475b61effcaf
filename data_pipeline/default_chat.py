"""The embedded default SFT set: questions and answers about the Python standard library.

Like the default pretraining corpus (`default_corpus.py`) it is read from the Python
installation at run time, so `make sft` needs no download. Each conversation asks about
a module, a function or a class of the standard library and the assistant answers from
its docstring (first paragraph) or its signature; some conversations have two or three
turns about the same module, some a system prompt. The pretrained model has read these
files, so SFT teaches it the format (answer, then stop) more than new facts.

`write_jsonl(path)` materialises the set once as chat JSON Lines (`messages` records),
which the SFT data pipeline then reads like any other chat source.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random

from data_pipeline import jsonl
from data_pipeline.default_corpus import _read, documents

SYSTEM = "You are a concise assistant who knows the Python standard library."
# A chat source path that stands for this set (the SFT stage writes it into the run directory).
EMBEDDED = "<embedded:stdlib_chat>"

_ASK_FUNCTION = ("What does `{q}` do?", "Explain `{q}` in one paragraph.", "What is `{q}` for?",
                 "Describe the function `{q}`.")
_ASK_CLASS = ("What is the class `{q}`?", "Explain `{q}`.", "What does the class `{q}` represent?")
_ASK_MODULE = ("What is the `{m}` module for?", "Describe the Python module `{m}`.",
               "What does the standard library module `{m}` provide?")
_ASK_SIGNATURE = ("What is the signature of `{q}`?", "How do I call `{q}`?")


def _first_paragraph(doc: str, limit: int = 500) -> str | None:
    para = doc.strip().split("\n\n")[0].strip()
    para = " ".join(line.strip() for line in para.splitlines())
    if len(para) < 20 or len(para) > limit:
        return None
    return para


def _pick(options, key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _module_name(key: str) -> str:
    rel = key.split(":", 1)[1]
    rel = rel[: -len(".py")] if rel.endswith(".py") else rel
    rel = rel.replace(os.sep, "/").replace("/", ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def module_pairs(module: str, src: str) -> list[tuple[str, str]]:
    """(question, answer) pairs about one module's source."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    doc = ast.get_docstring(tree, clean=True)
    para = doc and _first_paragraph(doc)
    if para:
        pairs.append((_pick(_ASK_MODULE, module).format(m=module), para))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        q = f"{module}.{node.name}"
        doc = ast.get_docstring(node, clean=True)
        para = doc and _first_paragraph(doc)
        if para:
            asks = _ASK_CLASS if isinstance(node, ast.ClassDef) else _ASK_FUNCTION
            pairs.append((_pick(asks, q).format(q=q), para))
        if isinstance(node, ast.FunctionDef):
            try:
                sig = f"`{node.name}({ast.unparse(node.args)})`"
            except Exception:  # noqa: BLE001 -- an odd AST: skip the signature
                continue
            if len(sig) < 200:
                pairs.append((_pick(_ASK_SIGNATURE, q).format(q=q), f"It is called as {sig}."))
    return pairs


def conversations(seed: int = 0) -> list[dict]:
    """Every conversation of the set, as {"messages": [...]} records (deterministic)."""
    out = []
    for d in documents():
        if d.kind != "code":
            continue
        module = _module_name(d.key)
        pairs = module_pairs(module, _read(d.path))
        rng = random.Random(f"{seed}:{module}")
        rng.shuffle(pairs)
        i = 0
        while i < len(pairs):
            turns = min(len(pairs) - i, rng.choice((1, 1, 1, 2, 3)))  # mostly single turns
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.2 else []
            for question, answer in pairs[i: i + turns]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.append({"messages": messages, "id": f"{module}#{i}"})
            i += turns
    return out


def write_jsonl(path: str, seed: int = 0) -> str:
    """Write the set to `path` (atomically, once); returns the path."""
    return jsonl.write_jsonl(path, conversations(seed), once=True)
