"""Servers in real subprocesses for the tests: `relaxlm serve` (or any command) on a free
loopback port, waited for until it answers and stopped afterwards, its output kept for the
failure message."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A port nobody listens on, released for the server to take."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def relaxlm_serve(*args: str, timeout: float = 120.0) -> Iterator[str]:
    """`relaxlm serve ARGS --port P`: its base URL once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "relaxlm", "serve", *args, "--port", str(port)]
    with running(command, port, health="/health", timeout=timeout) as url:
        yield url


@contextmanager
def running(
    command: list[str], port: int, *, health: str | None = None, timeout: float = 120.0
) -> Iterator[str]:
    """`command` in a subprocess, serving on `port`: its base URL once it takes connections
    (or, given `health`, once that path answers 200). The output goes to a file, not a pipe,
    so a chatty server never blocks on a full pipe."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url, port, health):
                if process.poll() is not None:
                    output.seek(0)
                    raise AssertionError(f"{command[1:5]} exited:\n{output.read().decode()}")
                assert time.monotonic() < deadline, f"{command[1:5]} did not start"
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise


def _answers(url: str, port: int, health: str | None) -> bool:
    try:
        if health is None:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        with urllib.request.urlopen(url + health, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False
