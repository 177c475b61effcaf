"""SIGTERM and SIGINT (Ctrl-C) end a run promptly in every phase, with one line.

`lm train` handles both signals for the whole command (`handling(watchdog=True)`); the
training loop nests in it (or, called as a library, installs the same handling for its
own duration). The run is always in one of two modes:

- **stop** (the default: start-up, preparing data and tokenizer, restoring, compiling the
  train step, waiting for data, finishing after the last step): a signal raises
  `Interrupted` in the main thread at once. The loop catches it while waiting for data
  and saves the last step's state if it is not saved yet; elsewhere there is nothing new
  to save, and the command ends with one line and exit code 128 + the signal's number
  (130 for SIGINT, 143 for SIGTERM).
- **finish** (`finishing()`: a train step and the hooks after it, a save): a signal is
  noted; the loop finishes the step, saves, and stops (exit code 0: the run resumes
  from there). A second Ctrl-C raises at once.

Python runs signal handlers only in the main thread, between bytecodes: while that
thread is inside a long call into C (XLA compiling, SentencePiece training, a read
that hangs) the handler waits for the call to return, and an exception it raises inside
a garbage-collection callback is only printed. So a watchdog thread learns of every
signal at once, through the interpreter's wakeup file descriptor; if the process has not
ended `grace` seconds after a signal that should stop it (and is not saving), the
watchdog prints the same line and ends it (`os._exit`: the run directory's lock goes
with the process, and callbacks registered with `on_forced_exit` run first).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A SIGTERM/SIGINT that stops the run now. A BaseException, like KeyboardInterrupt, so
    that `except Exception` does not swallow it."""

    def __init__(self, signum: int, phase: str, urgent: bool = False):
        self.signum, self.phase, self.urgent = signum, phase, urgent
        super().__init__(f"{self.name} while {phase}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def message(signum: int, phase: str) -> str:
    """The one line a run stopped by a signal with nothing new to save ends with."""
    return (f"lm: stopped by {signal.Signals(signum).name} while {phase}; nothing new to save "
            "(the run directory keeps its checkpoints): run the same command again to continue")


class Interrupts:
    """Signal handling of one command (see the module docstring)."""

    def __init__(self, watchdog: bool = False, grace: float = 5.0):
        self.received: int | None = None  # the first signal's number
        self.phase = "starting up"
        self.finishing_depth = 0
        self.grace = grace
        self._watchdog = watchdog
        self._cleanups: list[Callable[[], None]] = []
        self._pending_urgent = False
        self._old: dict = {}
        self._wakeup = None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    # -- installing --------------------------------------------------------------------

    def install(self) -> "Interrupts":
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        self._old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._retry)
        if self._watchdog:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r,), name="interrupt-watchdog", daemon=True).start()
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._wakeup is not None:
            r, w, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            os.close(w)  # the watchdog's read returns empty: it ends
            self._wakeup = None

    # -- the modes -----------------------------------------------------------------------

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Name what the run is doing (for the message); a signal stops it here at once."""
        old, self.phase = self.phase, phase
        try:
            if self.finishing_depth == 0:
                self.check()  # a signal noted in a step's hooks, or whose exception was swallowed
            yield
        finally:
            self.phase = old

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """A step and its hooks: a signal is noted, the loop acts on it after the block."""
        self.finishing_depth += 1
        try:
            yield
        finally:
            self.finishing_depth -= 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Statements that must not be cut in two (moving a run's files): a signal during
        them stops the run right after them."""
        before = self.received
        with self.finishing():
            yield
        if self.finishing_depth == 0 and before is None and self.received is not None:
            raise Interrupted(self.received, self.phase)

    def check(self) -> None:
        """Raise `Interrupted` if a signal was noted (in a `finishing` block)."""
        if self.received is not None:
            raise Interrupted(self.received, self.phase)

    @contextlib.contextmanager
    def on_forced_exit(self, fn: Callable[[], None]) -> Iterator[None]:
        """Run `fn` before the watchdog ends the process (e.g. put a moved run back)."""
        self._cleanups.append(fn)
        try:
            yield
        finally:
            self._cleanups.remove(fn)

    # -- the handler (main thread) and the watchdog --------------------------------------

    def _handle(self, signum: int, frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if not first and signum == signal.SIGINT:  # a second Ctrl-C: stop now, in any mode
            self._raise(frame, urgent=True)
        elif self.finishing_depth == 0:
            self._raise(frame)

    def _raise(self, frame, urgent: bool = False) -> None:
        if _swallowed_at(frame):  # the exception would only be printed: raise it in a moment
            self._pending_urgent |= urgent
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # -> _retry
            return
        self._pending_urgent = False
        raise Interrupted(signal.SIGINT if urgent else self.received, self.phase, urgent)

    def _retry(self, signum: int, frame) -> None:
        if self.received is not None and (self.finishing_depth == 0 or self._pending_urgent):
            self._raise(frame, self._pending_urgent)

    def _watch(self, fd: int) -> None:
        """The watchdog thread: a signal that should stop the run (in stop mode, or a second
        Ctrl-C) must end the process within `grace` seconds, unless the main thread is
        saving (in a `finishing` block) for a first one; else the main thread is stuck in
        C, or its exception was swallowed (a signal handler that raises inside a garbage
        collection callback is only printed), and the watchdog ends the process."""
        deadline, signum, urgent, ctrl_c = None, 0, False, 0
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if select.select([fd], [], [], wait)[0]:
                got = os.read(fd, 64)
                if not got:  # uninstalled
                    os.close(fd)
                    return
                for s in got:
                    if s not in SIGNALS:
                        continue
                    ctrl_c += s == signal.SIGINT
                    if s == signal.SIGINT and ctrl_c > 1:  # a second Ctrl-C: stop now, whatever runs
                        deadline, signum, urgent = time.monotonic() + min(self.grace, 2.0), s, True
                    elif deadline is None and self.finishing_depth == 0:
                        deadline, signum = time.monotonic() + self.grace, s
            elif deadline is not None and time.monotonic() >= deadline:
                if self.finishing_depth > 0 and not urgent:  # saving what was done: let it finish
                    deadline = time.monotonic() + self.grace
                    continue
                self._force(signum)

    def _force(self, signum: int) -> None:
        for fn in list(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            print(message(signum, self.phase), file=sys.stderr, flush=True)
        os._exit(128 + signum)


def _swallowed_at(frame) -> bool:
    """Whether an exception raised at `frame` would be printed and dropped: inside a
    garbage-collection callback (JAX registers one) or a finaliser."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


_current: Interrupts | None = None


@contextlib.contextmanager
def handling(watchdog: bool = False, grace: float = 5.0) -> Iterator[Interrupts]:
    """The signal handling in force, installed here if none is (and this is the main thread)."""
    global _current
    if _current is not None:
        yield _current
        return
    interrupts = Interrupts(watchdog=watchdog, grace=grace)
    if threading.current_thread() is not threading.main_thread():
        yield interrupts  # (signals are only delivered to the main thread: nothing to install)
        return
    _current = interrupts.install()
    try:
        yield interrupts
    finally:
        interrupts.uninstall()
        _current = None


def current() -> Interrupts | None:
    return _current


def during(phase: str):
    """`Interrupts.during(phase)` of the handling in force (nothing without one)."""
    return _current.during(phase) if _current is not None else contextlib.nullcontext()


def deferred():
    """`Interrupts.deferred()` of the handling in force (nothing without one)."""
    return _current.deferred() if _current is not None else contextlib.nullcontext()


def on_forced_exit(fn: Callable[[], None]):
    """`Interrupts.on_forced_exit(fn)` of the handling in force (nothing without one)."""
    return _current.on_forced_exit(fn) if _current is not None else contextlib.nullcontext()
