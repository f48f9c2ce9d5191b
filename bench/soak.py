"""Soak (`make soak`): 10,000 trips and resets against the real daemon and simulator.

Starts `killswitch ems-sim` and `killswitch run` as processes on loopback, then
loops POST /v1/trip + POST /v1/reset. Every SAMPLE_EVERY iterations it waits
until no sweep runs, clears the simulator's request record (so only the daemon
is measured) and samples the daemon's RSS (/proc/PID/status VmRSS) and open
file descriptors (/proc/PID/fd). It prints a table and the growth after
warm-up, and exits 1 when RSS grows more than MAX_GROWTH_MIB or the fds grow
(see `verdict`), 2 when the run breaks or exceeds its time bound. Every process is
started here and ended here, by its own pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ACCOUNTS = ("BINANCE", "KRAKEN/JOHN", "COINBASE", "BITSTAMP/2574")
SECRETS = {
    "SOAK_COINAPI_KEY": "soak-coinapi-key-2f9c1d",
    "SOAK_TRIP_TOKEN": "soak-trip-token-7a13",
    "SOAK_ONCALL_TOKEN": "soak-oncall-token-c40e",
}
ITERATIONS = 10_000
SAMPLE_EVERY = 500
WARMUP = 1_000
MAX_GROWTH_MIB = 10.0
TIME_LIMIT_SECONDS = 900.0
POLL_SECONDS = 0.02
SETTLE_READS = 10
SETTLE_PAUSE_SECONDS = 0.01


class SoakError(Exception):
    """The soak could not run to its end (a process died, a bound was exceeded)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    msg = f"no VmRSS for pid {pid}"
    raise SoakError(msg)


def fd_kinds(pid: int) -> tuple[int, int]:
    """(sockets, other fds) of process `pid`; an fd closed while we look is skipped."""
    sockets = others = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except FileNotFoundError:
            continue
        if str(target).startswith("socket:"):
            sockets += 1
        else:
            others += 1
    return sockets, others


def end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our own process by its pid; SIGKILL it if it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def started(
    argv: list[str], log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        end(proc)


def write_config(path: Path, sim_port: int, api_port: int) -> None:
    doc: dict[str, Any] = {
        "ems": {
            "default": {
                "base_url": f"http://127.0.0.1:{sim_port}",
                "api_key_env": "SOAK_COINAPI_KEY",
                "timeout_seconds": 2.0,
            }
        },
        "accounts": list(ACCOUNTS),
        "sweep": {
            "deadline_seconds": 5.0,
            "verify": True,
            "verify_attempts": 2,
            "resweep_interval_seconds": 0,
        },
        "api": {
            "listen": f"127.0.0.1:{api_port}",
            "tokens": [
                {
                    "name": "risk",
                    "token_env": "SOAK_TRIP_TOKEN",
                    "permissions": ["trip"],
                },
                {
                    "name": "oncall",
                    "token_env": "SOAK_ONCALL_TOKEN",
                    "permissions": ["trip", "reset", "status"],
                },
            ],
        },
        "triggers": {"signal": True},
        "state_dir": str(path.parent / "state"),
        "halt_file": str(path.parent / "halted"),
        "log": {"format": "json", "level": "info"},
    }
    path.write_text(yaml.safe_dump(doc))


@dataclass
class Sample:
    iteration: int
    elapsed_seconds: float
    rss_kib: int
    sockets: int
    others: int

    @property
    def fds(self) -> int:
        return self.sockets + self.others


class Soak:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        api: str,
        sim: str,
        daemon: subprocess.Popen[bytes],
    ) -> None:
        self.session = session
        self.api = api
        self.sim = sim
        self.daemon = daemon
        self.trip_auth = {"Authorization": f"Bearer {SECRETS['SOAK_TRIP_TOKEN']}"}
        self.oncall_auth = {"Authorization": f"Bearer {SECRETS['SOAK_ONCALL_TOKEN']}"}

    def alive(self) -> None:
        if self.daemon.poll() is not None:
            msg = f"the daemon exited {self.daemon.returncode}"
            raise SoakError(msg)

    async def call(
        self, method: str, url: str, headers: dict[str, str], body: Any, want: int
    ) -> Any:
        async with self.session.request(
            method, url, headers=headers, json=body
        ) as resp:
            doc = await resp.json(content_type=None)
            if resp.status != want:
                msg = f"{method} {url}: {resp.status} {doc}"
                raise SoakError(msg)
            return doc

    async def wait_until_ready(self, timeout_seconds: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            self.alive()
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.api + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(POLL_SECONDS)
        msg = f"daemon not ready within {timeout_seconds}s"
        raise SoakError(msg)

    async def wait_idle(self, timeout_seconds: float = 20.0) -> None:
        """No sweep in flight, so the sample sees no transient sockets or tasks."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            status = await self.call(
                "GET", self.api + "/v1/status", self.oncall_auth, None, 200
            )
            if not status["sweeping"]:
                return
            await asyncio.sleep(POLL_SECONDS)
        msg = f"sweeps still running after {timeout_seconds}s"
        raise SoakError(msg)

    async def settled_fds(self) -> tuple[int, int]:
        """The fewest fds over a few reads: a state write's brief open is not a leak."""
        reads = []
        for _ in range(SETTLE_READS):
            reads.append(fd_kinds(self.daemon.pid))
            await asyncio.sleep(SETTLE_PAUSE_SECONDS)
        return min(r[0] for r in reads), min(r[1] for r in reads)

    async def sample(self, iteration: int, started: float) -> Sample:
        await self.wait_idle()
        # The simulator keeps a record of every request; it is not under test.
        await self.call("POST", self.sim + "/_sim/reset", {}, None, 200)
        self.alive()
        sockets, others = await self.settled_fds()
        return Sample(
            iteration,
            time.monotonic() - started,
            rss_kib(self.daemon.pid),
            sockets,
            others,
        )

    async def run(self, iterations: int, every: int, limit: float) -> list[Sample]:
        started = time.monotonic()
        samples = [await self.sample(0, started)]
        print_row(samples[-1])
        for i in range(1, iterations + 1):
            await self.call(
                "POST", self.api + "/v1/trip", self.trip_auth, {"reason": f"soak {i}"},
                202,
            )  # fmt: skip
            await self.call(
                "POST", self.api + "/v1/reset", self.oncall_auth,
                {"reason": f"soak {i}"}, 200,
            )  # fmt: skip
            if i % every == 0:
                samples.append(await self.sample(i, started))
                print_row(samples[-1])
                if time.monotonic() - started > limit:
                    msg = f"over the {limit:.0f}s time bound at iteration {i}"
                    raise SoakError(msg)
        return samples


def print_row(s: Sample) -> None:
    rate = s.iteration / s.elapsed_seconds if s.elapsed_seconds else 0.0
    print(
        f"{s.iteration:>9} {s.elapsed_seconds:>9.1f} {s.rss_kib / 1024:>9.2f} "
        f"{s.fds:>5} {s.sockets:>7} {s.others:>6} {rate:>9.0f}",
        flush=True,
    )


def verdict(samples: list[Sample], warmup: int, max_growth_mib: float) -> int:
    """0 when nothing grew after warm-up, else 1 (and say what grew).

    RSS may grow at most `max_growth_mib`; fds other than sockets may not grow
    at all. Sockets may not exceed what the daemon had when ready plus one per
    account: the EMS pool keeps a second connection per account alive once a
    keep-warm probe has overlapped a sweep (when that first happens is chance);
    a leak goes past that bound.
    """
    base = next(s for s in samples if s.iteration >= warmup)
    after = [s for s in samples if s.iteration >= base.iteration]
    last = samples[-1]
    peak_mib = (max(s.rss_kib for s in after) - base.rss_kib) / 1024
    end_mib = (last.rss_kib - base.rss_kib) / 1024
    other_growth = max(s.others for s in after) - base.others
    socket_bound = samples[0].sockets + len(ACCOUNTS)
    socket_peak = max(s.sockets for s in samples)
    print(
        f"\nRSS at iteration {base.iteration}: {base.rss_kib / 1024:.2f} MiB; "
        f"at {last.iteration}: {last.rss_kib / 1024:.2f} MiB "
        f"(growth {end_mib:+.2f} MiB, peak {peak_mib:+.2f} MiB, "
        f"limit {max_growth_mib:g} MiB)"
    )
    print(
        f"fds other than sockets: {base.others} at {base.iteration}, "
        f"{last.others} at {last.iteration} (growth {other_growth:+d}, limit 0)"
    )
    print(
        f"sockets: {samples[0].sockets} when ready, {last.sockets} at "
        f"{last.iteration}, peak {socket_peak} (bound {socket_bound})"
    )
    print(f"trips + resets: {last.iteration} each in {last.elapsed_seconds:.1f}s")
    failed = peak_mib > max_growth_mib or other_growth > 0 or socket_peak > socket_bound
    print("SOAK FAILED" if failed else "soak ok")
    return 1 if failed else 0


async def soak(args: argparse.Namespace) -> int:
    env = {**os.environ, **SECRETS}
    sim_port, api_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="killswitch-soak-") as tmp:
        work = Path(tmp)
        config = work / "killswitch.yaml"
        write_config(config, sim_port, api_port)
        sim_argv = [
            sys.executable, "-m", "killswitch", "ems-sim",
            "--listen", f"127.0.0.1:{sim_port}", "--accounts", ",".join(ACCOUNTS),
            "--api-key-env", "SOAK_COINAPI_KEY",
        ]  # fmt: skip
        run_argv = [sys.executable, "-m", "killswitch", "run", "-c", str(config)]
        with (
            started(sim_argv, work / "sim.log", env),
            started(run_argv, work / "daemon.log", env) as daemon,
        ):
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                runner = Soak(
                    session,
                    f"http://127.0.0.1:{api_port}",
                    f"http://127.0.0.1:{sim_port}",
                    daemon,
                )
                await runner.wait_until_ready()
                print(
                    f"soak: {args.iterations} trips + resets, daemon pid {daemon.pid}, "
                    f"sample every {args.every}, warm-up {args.warmup}"
                )
                print(f"{'iteration':>9} {'seconds':>9} {'RSS MiB':>9} {'fds':>5} "
                      f"{'sockets':>7} {'others':>6} {'iter/s':>9}")  # fmt: skip
                try:
                    samples = await runner.run(args.iterations, args.every, args.limit)
                except SoakError as exc:
                    print(f"soak broken: {exc}; daemon log in {work}", file=sys.stderr)
                    print((work / "daemon.log").read_text()[-3000:], file=sys.stderr)
                    return 2
        return verdict(samples, args.warmup, args.max_growth_mib)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Soak the daemon with trips and resets."
    )
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--every", type=int, default=SAMPLE_EVERY)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--max-growth-mib", type=float, default=MAX_GROWTH_MIB)
    parser.add_argument("--limit", type=float, default=TIME_LIMIT_SECONDS)
    args = parser.parse_args(argv)
    if args.warmup > args.iterations:
        parser.error("--warmup must not exceed --iterations")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
