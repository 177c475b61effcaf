"""One process of a multi-process `lm train`, watched: when a peer dies, say so in one line.

When one process of a multi-process job dies (killed, out of memory, its host gone), the
others learn it from their next collective, and the runtime ends them its own way: gloo
throws from a native thread (`terminate called ... gloo::EnforceNotMet`, SIGABRT), or a
`JaxRuntimeError` is followed by the coordination service's fatal check and a native stack
dump: tens of lines, exit code 134. Nothing in Python can catch an abort, so `lm train`
with `--coordinator` (or LM_DISTRIBUTED) runs the work in a child process and watches it:

- the child's stdout passes straight through (progress, logs); its stderr is forwarded line
  by line until the first line of a crash (a native abort or error line, a fatal check, a
  traceback);
- if the child then fails, this process prints one line (what failed, and that rerunning the
  same commands on every host resumes from the last checkpoint), keeps the whole report in
  the run directory (`crash-process-N.log`) and exits 1; if it succeeds, the held lines are
  printed after all;
- SIGINT/SIGTERM are passed on to the child (which saves and stops as usual), and the child
  dies with this process (Linux `PR_SET_PDEATHSIG`): killing this process kills the work.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys

WORKER = "LM_TRAIN_WORKER"  # set in the child: it runs the work itself
CRASH = (b"terminate called", b"*** Check failure", b"Fatal Python error", b"Traceback (most recent call last)",
         b"*** SIGABRT", b"*** SIGSEGV")
NATIVE_FATAL = re.compile(rb"F\d{4} ")  # a fatal line of the runtime's native log
HELD_MAX = 20_000  # lines of a crash report kept (the rest are counted)
USER_ERROR = 2  # the exit code of a one-line user error (lm/cli.py): passed through as it is
PEER_GONE = re.compile(r"Connection reset by peer|Connection closed by peer|Socket closed|Received data size doesn't "
                       r"match|heartbeat|UNAVAILABLE|DEADLINE_EXCEEDED|failed to connect|Broken pipe|"
                       r"another task|Gloo .* failed", re.I)


def is_worker() -> bool:
    return bool(os.environ.get(WORKER))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the child outlives a killed parent until its next collective fails
        pass


def _segments(stream):
    """The bytes of `stream` in pieces that end with a newline or a carriage return (a progress
    bar redraws with the latter), as they come."""
    buf = b""
    while chunk := os.read(stream.fileno(), 65536):
        buf += chunk
        *done, buf = re.split(rb"(?<=[\r\n])", buf)
        yield from (d for d in done if d)
    if buf:
        yield buf


def run(argv: list[str], run_dir: str, process: str, command: list[str] | None = None) -> int:
    """Run `lm <argv>` (or `command`) as the watched child; returns the exit code for this process."""
    env = {**os.environ, WORKER: "1"}
    # its own process group: a Ctrl-C at the terminal reaches it once, passed on by this process
    child = subprocess.Popen(command or [sys.executable, "-m", "lm", *argv], env=env, stderr=subprocess.PIPE, process_group=0,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    held: list[bytes] = []
    dropped, screen = 0, True
    for piece in _segments(child.stderr):
        if held or piece.lstrip().startswith(CRASH) or NATIVE_FATAL.match(piece):
            if len(held) < HELD_MAX:
                held.append(piece)
            else:
                dropped += 1
            continue
        if screen:
            try:
                sys.stderr.buffer.write(piece)
                sys.stderr.flush()
            except OSError:  # nobody reads our stderr any more (`| head`): the run goes on
                screen = False
    code = child.wait()
    if not held:
        return code if code >= 0 else 128 - code
    if code in (0, USER_ERROR):  # a traceback it survived, or a user error after one: shown as they were
        if screen:
            sys.stderr.buffer.write(b"".join(held))
            sys.stderr.flush()
        return code
    if dropped:
        held.append(f"... ({dropped} more lines)\n".encode())
    report = b"".join(held).decode(errors="replace")
    path = os.path.join(run_dir, f"crash-{process.replace(' ', '-')}.log")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(report)
    except OSError:
        path = "not kept: the run directory is not writable"
    print(f"lm: error: {_gist(report, process)}; rerunning the same commands on every host resumes from the last "
          f"checkpoint (the runtime's report: {path})", file=sys.stderr, flush=True)
    return 1


def _gist(report: str, process: str) -> str:
    m = PEER_GONE.search(report)
    if m:
        return f"{process} stopped because another process of the run went away ({m.group(0)})"
    first = next((ln.strip() for ln in report.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))),
                 "no message")
    last = [ln.strip() for ln in report.splitlines() if ln.strip()][-1]
    return f"{process} crashed ({last[:200] if 'Error' in last else first[:200]})"
