"""SIGTERM/SIGINT handling (lm/interrupt.py) where a run cannot show it: a main thread stuck
in native code, and a signal whose exception Python would swallow. (The phases of a real
run, start-up, compilation and data waits, are tested in test_checkpoint.py.)"""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(body: str) -> subprocess.Popen:
    code = f"import gc, os, signal, sys, time\nsys.path.insert(0, {ROOT!r})\nfrom lm.train import interrupt\n{body}"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_watchdog_ends_a_process_whose_main_thread_is_stuck_in_native_code(tmp_path):
    """The main thread never runs Python again (SIGTERM blocked there, sleeping in C): one
    second after the signal the watchdog runs the cleanups (a cut --fresh puts the old run
    back this way), prints the one line and exits 143."""
    mark = tmp_path / "put_back"
    p = _child(
        "with interrupt.handling(watchdog=True, grace=1.0) as signals:\n"
        f"    put_back = lambda: open({str(mark)!r}, 'w').close()\n"
        "    with signals.during('a long native call'), signals.on_forced_exit(put_back):\n"
        "        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered to another thread\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n")
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # into time.sleep: a signal now finds no Python code running in the main thread
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "S":
        time.sleep(0.05)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 143 and time.time() - t0 < 10, (p.returncode, err)
    assert err.strip().startswith("lm: stopped by SIGTERM while a long native call") and "\n" not in err.strip(), err
    assert mark.exists()


def test_a_signal_inside_a_garbage_collection_callback_still_stops_the_run():
    """Python only prints an exception raised in a GC callback (JAX registers one): the
    handler defers it a moment instead, and the run stops all the same, without a traceback."""
    p = _child(
        "hit = []\n"
        "def callback(phase, info):\n"
        "    if phase == 'start' and not hit:\n"
        "        hit.append(1)\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # handled at once, inside the callback\n"
        "        for _ in range(1000): pass\n"
        "with interrupt.handling(watchdog=True, grace=30.0):\n"
        "    gc.callbacks.append(callback)  # (here: an automatic collection before would signal too early)\n"
        "    try:\n"
        "        gc.collect()\n"
        "        t0 = time.time()\n"
        "        while time.time() - t0 < 10: pass  # Python code, busy: the deferred stop must reach it\n"
        "        print('not stopped')\n"
        "    except interrupt.Interrupted as e:\n"
        "        print(f'stopped: {e.name} after {time.time() - t0:.2f}s')\n")
    out, err = p.communicate(timeout=60)
    assert out.startswith("stopped: SIGINT"), (out, err)
    assert float(out.split("after ")[1].rstrip("s\n")) < 1 and "Traceback" not in err and "ignored" not in err, err
