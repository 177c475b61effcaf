"""The watcher of a multi-process `lm train` (lm/train/supervise.py), with stand-in children:
what reaches the screen, the exit codes, the crash report, and signals."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from helpers import ROOT

from lm.train import supervise


def _child(tmp_path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text("import os, signal, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_a_user_error_after_a_harmless_native_line_keeps_its_line_and_exit_code(tmp_path, capfd):
    cmd = _child(tmp_path, """
        sys.stderr.write("E0000 00:00 harmless native log line\\n")
        sys.stderr.write("lm: error: the data directory /x is missing\\n")
        sys.exit(2)
    """)
    assert supervise.run([], str(tmp_path / "run"), "process 1", command=cmd) == 2
    err = capfd.readouterr().err
    assert "lm: error: the data directory /x is missing" in err and "crashed" not in err
    assert not (tmp_path / "run").exists()


def test_a_crash_is_one_line_its_report_is_kept_and_progress_passes_live(tmp_path, capfd):
    cmd = _child(tmp_path, """
        for i in range(3):
            sys.stderr.write(f"\\rstep {i}"); sys.stderr.flush()
        sys.stderr.write("\\nwarning: something to read\\n"); sys.stderr.flush()
        sys.stderr.write("terminate called after throwing an instance of 'gloo::EnforceNotMet'\\n")
        sys.stderr.write("  what():  Connection reset by peer\\n"); sys.stderr.flush()
        os.abort()
    """)
    assert supervise.run([], str(tmp_path / "run"), "process 0", command=cmd) == 1
    err = capfd.readouterr().err
    assert "\\rstep 0\\rstep 1\\rstep 2" in err.replace("\r", "\\r") and "warning: something to read" in err
    assert "terminate called" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lm: error: process 0 stopped because another process of the run went away "
                           "(Connection reset by peer)")
    report = (tmp_path / "run" / "crash-process-0.log").read_text()
    assert "gloo::EnforceNotMet" in report


def test_one_ctrl_c_reaches_the_work_once(tmp_path):
    """Ctrl-C at a terminal signals the whole foreground group: the child, in a group of its
    own, gets the watcher's one SIGINT, not two (a second one means "stop now, unsaved")."""
    counter = tmp_path / "count"
    child = _child(tmp_path, f"""
        got = []
        signal.signal(signal.SIGINT, lambda *_: got.append(1))
        open({str(tmp_path / "ready")!r}, "w").close()
        end = time.time() + 20
        while time.time() < end and not got:
            time.sleep(0.05)
        time.sleep(0.5)
        open({str(counter)!r}, "w").write(str(len(got)))
    """)
    watcher = (f"import sys; sys.path.insert(0, {ROOT!r}); from lm.train import supervise; "
               f"sys.exit(supervise.run([], {str(tmp_path / 'run')!r}, 'process 0', command={child!r}))")
    p = subprocess.Popen([sys.executable, "-c", watcher], start_new_session=True)
    start = time.monotonic()
    while not (tmp_path / "ready").exists():
        assert time.monotonic() - start < 30 and p.poll() is None
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the watcher's whole group
    assert p.wait(timeout=30) == 0
    assert counter.read_text() == "1"
