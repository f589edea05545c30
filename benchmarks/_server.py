"""A real ``mlflow server`` subprocess on 127.0.0.1, for the benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

_SETTLE_SECONDS = 10  # after /health answers, the server still starts its job runner


def start_server(root, backend_uri):
    """An ``mlflow server`` on a free port of 127.0.0.1; (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "served"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited; see {root / 'server.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                time.sleep(_SETTLE_SECONDS)
                return process, url
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise TimeoutError(f"mlflow server did not answer at {url} within 300 s")


def stop_server(process):
    """Kill the server and the processes it started (uvicorn, job runner)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
