"""A local Ray dies with the process that started it, even when that process is SIGKILLed.

`connect` starts this watchdog (``python -m pipelines.engine.reaper <pid>``, in its own session so a terminal's
Ctrl-C does not reach it) beside a local Ray. Every half second it notes the driver's descendants (GCS, raylet,
workers, the dashboard and runtime-env agents); once the driver is gone it stops those still running (SIGTERM,
then SIGKILL after a few seconds) and exits. A driver that shuts down normally stops the watchdog first
(`ray_runtime.shutdown`), then reaps its own children."""

from __future__ import annotations

import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def watch(driver_pid: int) -> None:
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    me = psutil.Process().pid
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me and child.pid not in known:
                    known[child.pid] = child  # psutil.Process remembers its create time: no pid-reuse mistakes
        except psutil.NoSuchProcess:
            break
        except psutil.Error:
            pass
        time.sleep(POLL_S)
    alive = [p for p in known.values() if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
