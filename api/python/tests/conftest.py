"""Fixtures that start a real `kvtier serve` process (binary from $KVTIER_BIN, else the
workspace's target/release/kvtier) on free loopback ports with its data dir in a tmp dir."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]


def kvtier_bin() -> str:
    b = os.environ.get("KVTIER_BIN") or str(ROOT / "target" / "release" / "kvtier")
    if not os.path.exists(b):
        pytest.fail(f"kvtier binary not found at {b}: cargo build --release -p kvtier")
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    address: str
    socket_path: str
    data_dir: Path

    @property
    def unix_address(self) -> str:
        return "unix:" + self.socket_path

    def cli(self, *args: str, tenant: Optional[str] = None, token: Optional[str] = None) -> str:
        cmd = [kvtier_bin(), *args, "--server", self.address]
        if tenant is not None:
            cmd += ["--tenant", tenant]
        if token is not None:
            cmd += ["--token", token]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(data_dir: Path, *extra: str) -> Server:
    port = free_port()
    sock = str(data_dir / "kvtier.sock")
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            kvtier_bin(), "serve",
            "--data-dir", str(data_dir / "data"),
            "--listen", f"127.0.0.1:{port}",
            "--socket", sock,
            "--http", f"127.0.0.1:{free_port()}",
            "--host-bytes", "512MiB", "--disk-bytes", "1GiB",
            "--log", "error",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtier serve exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if os.path.exists(sock):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("kvtier serve did not come up in 30 s")
        time.sleep(0.05)
    return Server(proc, f"127.0.0.1:{port}", sock, data_dir)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "kvtier")
    yield s
    s.stop()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "kvtier-token", "--token", "s3cret-token")
    yield s
    s.stop()
