"""The processes under test: the EMS simulator and the real daemon, on loopback.

Every process is started here and ended here, by its own pid. The daemon's stdout
is a pipe (as under journald), drained by a thread that keeps the events the
benchmark waits for, so the daemon never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from rawhttp import SyncClient, build_request, require

SECRETS = {
    "BENCH_COINAPI_KEY": "bench-coinapi-key-5d1f0a9e",
    "BENCH_TRIP_TOKEN": "bench-trip-token-8c2b",
    "BENCH_ONCALL_TOKEN": "bench-oncall-token-31e7",
}
PIPE_BYTES = 1 << 20
#: Only these events are parsed; everything else is just written to the log file.
WATCHED = (b"fanout_finished", b"daemon_ready", b"account_not_flat")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the daemon's config needs a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _end(proc: subprocess.Popen[bytes], timeout_seconds: float = 20.0) -> None:
    """SIGTERM the process we started, SIGKILL it if it will not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    msg = f"no VmRSS in /proc/{pid}/status"
    raise RuntimeError(msg)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


class Simulator:
    """`killswitch ems-sim` as a process, driven through its /_sim/ control API."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._ctl: SyncClient | None = None
        self.api_key = SECRETS["BENCH_COINAPI_KEY"]

    def start(self) -> Simulator:
        argv = [
            sys.executable, "-m", "killswitch", "ems-sim",
            "--listen", "127.0.0.1:0", "--accounts", "BENCH",
            "--api-key-env", "BENCH_COINAPI_KEY",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "sim.stderr").open("wb"),
            env={**os.environ, **SECRETS},
        )
        require(self.proc.stdout is not None, "self.proc.stdout is not None")
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match is None:
            _end(self.proc)
            msg = f"ems-sim did not start: {line!r}"
            raise RuntimeError(msg)
        self.port = int(match.group(1))
        self._ctl = SyncClient(self.host, self.port)
        self._ctl.connect()
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        require(self.proc is not None, "self.proc is not None")
        return self.proc.pid

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        require(self._ctl is not None, "self._ctl is not None")
        body = b"" if doc is None else json.dumps(doc).encode()
        headers = {"Content-Type": "application/json"} if doc is not None else {}
        status, answer = self._ctl.call(
            build_request(
                method, path, f"{self.host}:{self.port}", body=body, headers=headers
            )
        )
        if status != 200:
            msg = f"ems-sim {method} {path}: {status} {answer}"
            raise RuntimeError(msg)
        return answer

    def reset(self, accounts: Iterable[str], latency_seconds: float) -> None:
        """Fresh orders, an empty record, and the latency (a reset clears it)."""
        self._call(
            "POST", "/_sim/reset", {"accounts": list(accounts), "orders_per_account": 3}
        )
        if latency_seconds:
            self._call("POST", "/_sim/faults", {"latency_seconds": latency_seconds})

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self._call(
            "GET", f"/_sim/requests?since={since}"
        )
        return answer

    def stop(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
        if self.proc is not None:
            _end(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def write_config(
    path: Path,
    sim: Simulator,
    accounts: list[str],
    *,
    log_level: str = "info",
    pnl_file: Path | None = None,
) -> int:
    """The benchmark's daemon config: production settings on loopback; its port."""
    port = free_port()
    state = path.parent / f"state-{path.stem}"
    doc: dict[str, Any] = {
        "ems": {
            "default": {
                "base_url": sim.base_url,
                "api_key_env": "BENCH_COINAPI_KEY",
                "timeout_seconds": 2.0,
            }
        },
        "accounts": accounts,
        "retry": {
            "max_attempts": 6,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 1.0,
            "max_attempts_other": 2,
        },
        "sweep": {
            "deadline_seconds": 15.0,
            "verify": True,
            "verify_attempts": 3,
            # Off so that no background re-sweep overlaps a measured trip.
            "resweep_interval_seconds": 0,
        },
        "api": {
            "listen": f"127.0.0.1:{port}",
            "max_body_bytes": 65536,
            "tokens": [
                {
                    "name": "risk-engine",
                    "token_env": "BENCH_TRIP_TOKEN",
                    "permissions": ["trip"],
                },
                {
                    "name": "oncall",
                    "token_env": "BENCH_ONCALL_TOKEN",
                    "permissions": ["trip", "reset", "status"],
                },
            ],
        },
        "triggers": {"signal": True},
        "state_dir": str(state),
        "halt_file": str(path.parent / f"halted-{path.stem}"),
        "log": {"format": "json", "level": log_level},
    }
    if pnl_file is not None:
        doc["triggers"]["pnl"] = [
            {
                "name": "desk",
                "path": str(pnl_file),
                "field": "pnl",
                "max_loss": 50000,
                "stale_after_seconds": 0,
                "poll_interval_seconds": 0.25,
            }
        ]
    path.write_text(yaml.safe_dump(doc))
    return port


class Daemon:
    """`python -m killswitch run -c FILE`, its log drained by a reader thread."""

    def __init__(
        self,
        config_path: Path,
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self._env = {**os.environ, **SECRETS, **(env or {})}
        self._cwd = cwd
        self.port = port
        self.host = "127.0.0.1"
        self.log_path = config_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_monotonic = 0.0
        self._events: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.api = SyncClient(self.host, port)
        self.trip_token = SECRETS["BENCH_TRIP_TOKEN"]
        self.oncall_token = SECRETS["BENCH_ONCALL_TOKEN"]

    def start(self) -> Daemon:
        argv = [sys.executable, "-m", "killswitch", "run", "-c", str(self.config_path)]
        self.spawned_monotonic = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            cwd=self._cwd,
        )
        require(self.proc.stdout is not None, "self.proc.stdout is not None")
        with contextlib.suppress(OSError):  # 64 KiB will do while the reader keeps up
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout,), daemon=True
        )
        self._reader.start()
        return self

    @property
    def pid(self) -> int:
        require(self.proc is not None, "self.proc is not None")
        return self.proc.pid

    def _read(self, stream: Any) -> None:
        with self.log_path.open("wb") as out:
            for line in stream:
                out.write(line)
                if not any(w in line for w in WATCHED):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["_read_monotonic"] = time.monotonic()
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_seconds: float = 20.0,
    ) -> dict[str, Any]:
        """Take (and drop everything before) the first watched event matching."""
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while True:
                while self._events:
                    event = self._events.popleft()
                    if predicate(event):
                        return event
                if self.proc is not None and self.proc.poll() is not None:
                    msg = f"daemon exited {self.proc.returncode}; see {self.log_path}"
                    raise RuntimeError(msg)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = (
                        f"no matching event within {timeout_seconds}s ({self.log_path})"
                    )
                    raise TimeoutError(msg)
                self._cond.wait(remaining)

    def drain_events(self) -> None:
        with self._cond:
            self._events.clear()

    def request(
        self, method: str, path: str, *, token: str | None = None, doc: Any = None
    ) -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = b""
        if doc is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(doc).encode()
        return self.api.call(
            build_request(
                method, path, f"{self.host}:{self.port}", body=body, headers=headers
            )
        )

    def wait_ready(self, timeout_seconds: float = 20.0) -> tuple[float, float]:
        """Block until `daemon_ready` is logged and /readyz is 200.

        Returns the monotonic times of both, measured by this process.
        """
        event = self.wait_event(
            lambda e: e.get("event") == "daemon_ready", timeout_seconds
        )
        logged = event["_read_monotonic"]
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                self.api.connect()
                status, _ = self.request("GET", "/readyz")
            except OSError:
                status = 0
            if status == 200:
                return logged, time.monotonic()
            if time.monotonic() > deadline:
                msg = f"/readyz not 200 within {timeout_seconds}s ({self.log_path})"
                raise TimeoutError(msg)
            time.sleep(0.005)

    def reset(self) -> None:
        status, body = self.request(
            "POST", "/v1/reset", token=self.oncall_token, doc={"reason": "bench"}
        )
        if status != 200:
            msg = f"reset answered {status}: {body}"
            raise RuntimeError(msg)

    def metrics_text(self) -> str:
        status, body = self.request("GET", "/metrics")
        if status != 200 or not isinstance(body, str):
            msg = f"/metrics answered {status}"
            raise RuntimeError(msg)
        return body

    def stop(self) -> int | None:
        self.api.close()
        if self.proc is None:
            return None
        _end(self.proc)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.proc.returncode
