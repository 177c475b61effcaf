"""The embedded default corpus: text every Python installation carries.

Nothing is downloaded and nothing is copied into the repository. At run time we read
- code: the standard library's own `.py` files (tests, site-packages and vendored
  third-party code left out), one document per file;
- prose: the documentation topics of `pydoc_data/topics.py` (one document per topic)
  and every module's docstring, read with `ast` without importing the module.

Each document has a stable key (its path relative to the standard library, plus a
suffix for prose); the train/held-out split is a hash of that key, so it is the same on
every machine with the same Python, whatever the file system order.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sysconfig
import threading
from functools import lru_cache

from data_pipeline.errors import UserError

_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo", "pydoc_data", "idlelib", "tkinter"}


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable name, e.g. "code:json/decoder.py" or "doc:topic:assert"
    kind: str  # "code" or "prose"
    path: str | None  # file to read (code, docstrings); None for pydoc topics

    def text(self) -> str:
        if self.key.startswith("doc:topic:"):
            return _pydoc_topics()[self.key[len("doc:topic:"):]]
        src = _read(self.path)
        if self.kind == "code":
            return src
        return _docstring(src) or ""


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


_AST_LOCK = threading.Lock()  # CPython 3.11's parser is not safe across threads


def _docstring(src: str) -> str | None:
    try:
        with _AST_LOCK:
            tree = ast.parse(src)
        return ast.get_docstring(tree, clean=True)
    except (SyntaxError, ValueError):
        return None


@lru_cache(maxsize=1)
def _pydoc_topics() -> dict[str, str]:
    from pydoc_data import topics  # plain data module shipped with CPython

    return dict(topics.topics)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """All documents of the default corpus, sorted by key."""
    root = stdlib_dir()
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            docs.append(Document(f"code:{rel}", "code", path))
            docs.append(Document(f"doc:module:{rel}", "prose", path))
    for topic in sorted(_pydoc_topics()):
        docs.append(Document(f"doc:topic:{topic}", "prose", None))
    if not docs:
        raise UserError(f"no standard-library sources found under {root}; "
                           "is this a minimal Python without its .py files?")
    return tuple(sorted(docs, key=lambda d: d.key))


def _split_key(doc: Document) -> str:
    # Code and the docstring of the same file land on the same side of the split.
    return doc.key.split(":", 2)[-1] if doc.key.startswith("doc:module:") else doc.key.split(":", 1)[-1]


def is_heldout(doc: Document, fraction: float) -> bool:
    h = hashlib.sha256(_split_key(doc).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split(fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents, deterministic given `fraction`."""
    train, heldout = [], []
    for d in documents():
        (heldout if is_heldout(d, fraction) else train).append(d)
    return train, heldout
