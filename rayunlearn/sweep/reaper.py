"""Ray's processes die with the sweep driver that started them.

A driver that starts its own local Ray (``rayunlearn.sweep.tuner.init_ray`` without an address)
owns the GCS, the raylet, the dashboard and runtime-env agents and the workers. Killed with
SIGKILL it runs no cleanup, and those processes (reparented to init) can outlive it by minutes.
So the driver starts this watchdog in its own session:

    python -m rayunlearn.sweep.reaper <driver pid>

It notes the driver's descendants every second and, once the driver is gone, terminates every
one still alive (their own children included), then kills what ignored the request. Processes
are held as ``psutil.Process`` objects, which refuse to signal a recycled pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def start(driver_pid: int) -> subprocess.Popen:
    """The watchdog for ``driver_pid``, in a new session (a signal to the driver's process group
    does not reach it)."""
    return subprocess.Popen([sys.executable, "-m", "rayunlearn.sweep.reaper", str(driver_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def watch(driver_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Wait for ``driver_pid`` to end, then end the descendants it had."""
    import psutil

    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, psutil.Process] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for p in driver.children(recursive=True):
                if p.pid != me:
                    known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            break
        known = {pid: p for pid, p in known.items() if p.is_running()}
        time.sleep(poll_s)
    left = []
    for p in list(known.values()):
        try:
            left.extend(c for c in p.children(recursive=True) if c.pid != me)
        except psutil.NoSuchProcess:
            pass
        left.append(p)
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
