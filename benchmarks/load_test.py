"""The HTTP load test of benchmarks/serving.py: `diffprune serve` in its own process on
127.0.0.1, --clients concurrent clients for --load-seconds, requests spread over 16 tasks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SENTENCE = "the committee will meet next week to discuss the new budget and the hiring plan"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_patches(base, folder: Path, density: float, bare: bool, tasks: int = 16) -> list[str]:
    """16 random patches, or for the bare base 16 head-only patches (no base entry changed)."""
    from diffprune.serving.synthetic import random_patch

    names = []
    for t in range(tasks):
        patch = random_patch(base, density, 2 + t % 2, seed=t, tensors=[] if bare else None)
        patch.save(folder / f"t{t}.safetensors")
        names.append(f"t{t}")
    return names


def wait_until_up(url: str, server: subprocess.Popen, limit: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def warm_up(url: str, names: list[str]) -> None:
    """One request per task before the clock starts: patches read, kernels compiled."""
    import httpx

    with httpx.Client(timeout=300) as http:
        for name in names:
            http.post(f"{url}/tasks/{name}/predict", json={"inputs": [SENTENCE]}).raise_for_status()


def clients(url: str, names: list[str], count: int, seconds: float) -> tuple[list[float], int]:
    import httpx

    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            k = 0
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    ok = http.post(f"{url}/tasks/{names[(i + k) % len(names)]}/predict",
                                   json={"inputs": [SENTENCE]}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(took)
                    else:
                        errors[0] += 1
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def load_test(base, args, bare: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        names = write_patches(base, Path(folder), args.density, bare)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        server = subprocess.Popen([sys.executable, "-m", "diffprune", "serve", "--patches", folder,
                                   "--host", "127.0.0.1", "--port", str(port)], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, server)
            warm_up(url, names)
            start = time.monotonic()
            latencies, errors = clients(url, names, args.clients, args.load_seconds)
            elapsed = time.monotonic() - start
        finally:
            server.send_signal(signal.SIGINT)  # a clean shutdown: queued requests answered first
            try:
                exit_code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_code = "killed"
    latencies.sort()
    n = len(latencies)
    return {"bare": bare, "requests": n, "errors": errors, "seconds": round(elapsed, 1),
            "throughput_rps": round(n / elapsed, 2),
            "p50_ms": round(1e3 * latencies[n // 2], 1) if n else None,
            "p99_ms": round(1e3 * latencies[min(n - 1, int(0.99 * n))], 1) if n else None,
            "server_exit": exit_code}
