"""The one JSON Lines writer: records written to a temporary file, then moved into place."""

from __future__ import annotations

import json
import os
from typing import Iterable


def write_jsonl(path: str, records: Iterable[dict], once: bool = False) -> str:
    """Write `records` to `path`, one JSON object per line (UTF-8, non-ASCII kept), atomically:
    a reader never sees half a file. With `once`, an existing file is kept as it is (data
    generated from a seed, written the first time a run needs it). Returns `path`."""
    if once and os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
