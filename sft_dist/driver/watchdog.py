"""An embedded Ray (one this process started with `ray.init`, not a cluster it joined) ends with this
process, however it ends: a normal exit, Ctrl+C, or a SIGKILL that runs no cleanup at all.

Ray's head processes share the driver's fate, but not everything they start: after a SIGKILL of the
driver, Ray 2.60's DashboardAgent and RuntimeEnvAgent lived on, holding their ports. So a small
watchdog process starts beside the embedded Ray, in a session of its own, and waits on a pipe whose
other end only this process holds. When the pipe closes (this process is gone) it ends every process
of that Ray session: those this process had started (matched by pid and start time), and any whose
command line or environment names the session's folder, which only that session's processes do.
Nothing else is touched: a cluster we merely joined gets no watchdog.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GRACE_S = 5.0  # between SIGTERM and SIGKILL
_held_open: list[int] = []  # the pipe's write end: never written, closed only by this process's end


def watch(session_dir: str) -> None:
    """Start the watchdog of the embedded Ray session `session_dir` (call right after `ray.init`)."""
    import psutil

    started = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
    read_end, write_end = os.pipe()  # not inheritable: children exec'd later never hold the write end
    subprocess.Popen([sys.executable, "-m", "sft_dist.driver.watchdog", session_dir, json.dumps(started)],
                     stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read_end)
    _held_open.append(write_end)


def session_processes(session_dir: str, started: list[tuple[int, float]]) -> list:
    """The live processes of the session: those started by the driver, and those naming its folder."""
    import psutil

    found = {}
    for pid, created in started:
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 0.01:  # the same process, not a reused pid
                found[pid] = process
        except psutil.Error:
            continue
    for process in psutil.process_iter():
        if process.pid == os.getpid() or process.pid in found:
            continue
        try:
            named = session_dir in " ".join(process.cmdline()) or session_dir in " ".join(process.environ().values())
        except psutil.Error:
            continue
        if named:
            found[process.pid] = process
    return list(found.values())


def end_session(session_dir: str, started: list[tuple[int, float]]) -> None:
    import psutil

    victims = session_processes(session_dir, started)
    for process in victims:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(victims, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue


def main(argv: list[str]) -> None:
    session_dir, started = argv[0], [tuple(item) for item in json.loads(argv[1])]
    sys.stdin.buffer.read()  # returns at end of file: the driver is gone
    end_session(session_dir, started)


if __name__ == "__main__":
    main(sys.argv[1:])
