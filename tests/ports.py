"""Ports for the tests' servers without the pick-then-release race.

Picking a free port, closing it and handing the number on leaves a gap in which another process can
take it: the server then fails to start, or worse, the test talks to that other process. Here each
server ends up holding its port:
- `serving(demo)`: a Gradio demo launched in this process; a port taken in the gap makes the launch
  fail (Gradio's "Cannot find empty port"), and it is retried on a new one.
- `start_app(cmd, ...)`: `python app.py` in a subprocess; Gradio binds the first free port from
  GRADIO_SERVER_PORT on and prints it, and the URL is read back from that line of the app's log.
- `refused_port()`: a port that nothing can listen on while the test runs (bound here, never
  listening), for "the server cannot be reached".
Servers the tests write themselves bind port 0 and report the port they got (tests/fake_hub.py).
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

TAKEN = "Cannot find empty port"      # launch(server_port=P) when P is in use (Gradio's bind or uvicorn's)
TRIES = 5


def pick_port() -> int:
    """A port free at this instant (it may be taken before it is used: callers retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo):
    """`demo` launched in this process on a loopback port it holds; yields its URL."""
    for _ in range(TRIES):
        port = pick_port()
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            break
        except OSError as exc:
            if TAKEN not in str(exc):
                raise
    else:
        raise AssertionError(f"no free port in {TRIES} tries")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def start_app(cmd: list[str], cwd, env: dict, log_path: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start the Gradio app `cmd` (stdout + stderr to `log_path`) on 127.0.0.1 and return it with the URL
    its own log reports. GRADIO_SERVER_PORT (a port free a moment ago) is only where Gradio starts
    looking: it binds the first free port from there on and prints "Running on local URL: ...:PORT",
    so a port taken in the meantime costs nothing. An exit or a timeout first: AssertionError + the log."""
    run_env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(pick_port()),
               "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        listening = re.search(r"Running on local URL:  (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if listening:
            return proc, listening.group(1) + "/"
        time.sleep(0.5)
    stop(proc)
    raise AssertionError(f"{cmd} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")


@contextmanager
def refused_port():
    """A loopback port on which every connection is refused for as long as the block runs: bound here
    (so no other process can listen on it) and never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
