"""`make bench`: how fast the kill switch cancels everything, side by side.

Starts the EMS simulator and the real daemon on loopback and measures (see
issue 5 and BENCHMARKS.md): sweep time per N accounts and EMS latency D for both
triggers, the alternatives on-call would use instead, trigger -> wire, the
simulator's own ceiling, trigger -> wire under a flood of unauthenticated
requests, and the daemon's footprint. Prints a Markdown report and writes it to
BENCHMARKS.md, with the raw figures in bench/results.json.

    .venv/bin/python bench/run.py [--quick]

Every process is started here and ended here by its pid; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
import rawhttp
import report
from rawhttp import require
from stats import histogram_buckets, histogram_quantile, summary

REPO = Path(__file__).resolve().parent.parent
WIRE_METRIC = "killswitch_trigger_to_wire_seconds"
CANCEL_ALL = "/v1/orders/cancel/all"
#: Pause after each reset, so that the state and audit writes of the previous
#: trip (off the hot path, fsynced) are not what the next trip measures.
SETTLE_SECONDS = 0.03


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run or a --quick smoke run."""

    sizes: tuple[int, ...]
    latencies: tuple[float, ...]
    reps: int  # per (N, D, trigger)
    wire_reps: int  # at N = 32, D = 0, per trigger (the trigger -> wire figures)
    alt_sizes: tuple[int, ...]
    alt_reps: int
    alt_slow_reps: int  # the sequential loops at N >= 32 and D > 0
    ceiling_reps: int
    flood_rate: float
    flood_seconds: float
    trips: int  # footprint: trips before the second RSS reading
    idle_seconds: float


FULL = Plan(
    sizes=(1, 8, 32, 64),
    latencies=(0.0, 0.05),
    reps=30,
    wire_reps=100,
    alt_sizes=(1, 8, 32, 64),
    alt_reps=10,
    alt_slow_reps=5,
    ceiling_reps=30,
    flood_rate=500.0,
    flood_seconds=10.0,
    trips=1000,
    idle_seconds=30.0,
)
QUICK = Plan(
    sizes=(8, 32),
    latencies=(0.0, 0.05),
    reps=8,
    wire_reps=20,
    alt_sizes=(32,),
    alt_reps=3,
    alt_slow_reps=2,
    ceiling_reps=8,
    flood_rate=500.0,
    flood_seconds=3.0,
    trips=100,
    idle_seconds=5.0,
)
HEADLINE_N = 32
HEADLINE_D = 0.05


def accounts_for(n: int) -> list[str]:
    """N account ids, tagged like real ones (`EXCHANGE/ACCOUNT`)."""
    return [f"EXCH{i:02d}/DESK{i % 4}" for i in range(n)]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the daemon under test -----------------------------------------------------------


@dataclass
class Started:
    """A running daemon and what its start cost."""

    daemon: procs.Daemon
    accounts: list[str]
    ready_log_seconds: float
    ready_http_seconds: float
    rss_kib_ready: int
    webhook_request: bytes = b""


@contextmanager
def running_daemon(
    workdir: Path, sim: procs.Simulator, n: int, name: str
) -> Iterator[Started]:
    """Start a daemon for N accounts, wait until READY and its lines are warm."""
    accounts = accounts_for(n)
    pnl = workdir / "pnl.json"
    if not pnl.exists():
        pnl.write_text('{"pnl": 0}\n')
    config = workdir / f"{name}.yaml"
    port = procs.write_config(config, sim, accounts, pnl_file=pnl)
    sim.reset(accounts, 0.0)
    daemon = procs.Daemon(config, port).start()
    try:
        logged, http_ready = daemon.wait_ready()
        time.sleep(0.3)  # the cancel lines connect in the background
        started = Started(
            daemon=daemon,
            accounts=accounts,
            ready_log_seconds=logged - daemon.spawned_monotonic,
            ready_http_seconds=http_ready - daemon.spawned_monotonic,
            rss_kib_ready=procs.rss_kib(daemon.pid),
            webhook_request=rawhttp.build_request(
                "POST",
                "/v1/trip",
                f"127.0.0.1:{port}",
                body=json.dumps({"reason": "bench"}).encode(),
                headers={
                    "Authorization": f"Bearer {daemon.trip_token}",
                    "Content-Type": "application/json",
                },
            ),
        )
        yield started
    finally:
        code = daemon.stop()
        if code not in (0, None):
            log(f"daemon {name} exited {code}; see {daemon.log_path}")


@dataclass
class TripSample:
    source: str
    sweep_ms: float  # sent -> last account's cancel-all answered
    wire_ms: float  # the daemon's own: trigger seen -> last cancel-all written
    sent_to_seen_ms: float
    sent_to_wire_ms: float  # sent -> last cancel-all written (daemon's stamp)
    sim_wire_ms: float  # sent -> last first cancel-all received (simulator's stamp)
    ok: bool
    problem: str = ""


def trip_once(
    started: Started, sim: procs.Simulator, latency: float, source: str
) -> TripSample:
    """Trip once (signal or webhook), wait for the sweep's end, reset; one sample."""
    daemon = started.daemon
    n = len(started.accounts)
    sim.reset(started.accounts, latency)
    daemon.drain_events()
    if source == "signal":
        sent = time.monotonic()
        os.kill(daemon.pid, signal.SIGUSR1)
        event = daemon.wait_event(
            lambda e: e.get("event") == "fanout_finished" and e["source"] == "signal"
        )
    else:
        sent = daemon.api.send(started.webhook_request)
        status, body = daemon.api.receive()
        if status != 202:
            msg = f"POST /v1/trip answered {status}: {body!r}"
            raise RuntimeError(msg)
        trip_id = json.loads(body)["trip_id"]
        event = daemon.wait_event(
            lambda e: e.get("event") == "fanout_finished" and e["trip_id"] == trip_id
        )
    first: dict[str, float] = {}
    for record in sim.requests():
        if record["path"] == CANCEL_ALL and record["exchange_id"] not in first:
            first[record["exchange_id"]] = record["received_monotonic"]
    daemon.reset()
    problem = ""
    if event["ok"] != n or len(first) != n:
        problem = (
            f"ok={event['ok']} failed={event['failed']} first cancel-alls={len(first)}"
        )
    time.sleep(SETTLE_SECONDS)
    return TripSample(
        source=source,
        sweep_ms=(event["cancelled_monotonic"] - sent) * 1000,
        wire_ms=event["wire_ms"],
        sent_to_seen_ms=(event["seen_monotonic"] - sent) * 1000,
        sent_to_wire_ms=(event["wire_monotonic"] - sent) * 1000,
        sim_wire_ms=(max(first.values(), default=sent) - sent) * 1000,
        ok=not problem,
        problem=problem,
    )


def describe(samples: list[TripSample]) -> dict[str, Any]:
    good = [s for s in samples if s.ok]
    return {
        "reps": len(samples),
        "failed_reps": len(samples) - len(good),
        "problems": sorted({s.problem for s in samples if s.problem})[:5],
        "sweep_ms": summary([s.sweep_ms for s in good]),
        "wire_ms": summary([s.wire_ms for s in good]),
        "sent_to_seen_ms": summary([s.sent_to_seen_ms for s in good]),
        "sent_to_wire_ms": summary([s.sent_to_wire_ms for s in good]),
        "sim_wire_ms": summary([s.sim_wire_ms for s in good]),
    }


def wire_histogram(daemon: procs.Daemon) -> dict[str, dict[float, float]]:
    return histogram_buckets(daemon.metrics_text(), WIRE_METRIC)


# --- sections ------------------------------------------------------------------------


def section_sweep(
    plan: Plan, workdir: Path, sim: procs.Simulator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """1 and 3: sweep time for every N, D and trigger; trigger -> wire at N = 32."""
    rows: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    for n in plan.sizes:
        with running_daemon(workdir, sim, n, f"sweep-n{n}") as started:
            cold = trip_once(started, sim, 0.0, "signal")
            starts.append(
                {
                    "n": n,
                    "ready_log_s": started.ready_log_seconds,
                    "ready_http_s": started.ready_http_seconds,
                    "rss_mib_ready": started.rss_kib_ready / 1024,
                    "cold_trip": cold.__dict__,
                }
            )
            for latency in plan.latencies:
                for source in ("signal", "webhook"):  # warm-up, not measured
                    trip_once(started, sim, latency, source)
                reps = plan.reps
                if n == HEADLINE_N and latency == 0:
                    reps = max(reps, plan.wire_reps)
                before = wire_histogram(started.daemon)
                samples: dict[str, list[TripSample]] = {"signal": [], "webhook": []}
                for _ in range(reps):
                    for source in ("signal", "webhook"):  # interleaved: same drift
                        samples[source].append(trip_once(started, sim, latency, source))
                after = wire_histogram(started.daemon)
                for source, taken in samples.items():
                    row = {"n": n, "latency_ms": latency * 1000, "trigger": source}
                    row.update(describe(taken))
                    row["histogram_p50_le_ms"] = 1000 * histogram_quantile(
                        before.get(source, {}), after.get(source, {}), 50
                    )
                    row["histogram_p99_le_ms"] = 1000 * histogram_quantile(
                        before.get(source, {}), after.get(source, {}), 99
                    )
                    rows.append(row)
                    log(
                        f"sweep N={n} D={latency * 1000:.0f}ms {source}: median "
                        f"{row['sweep_ms']['median']:.2f} ms over {row['reps']} reps"
                    )
            starts[-1]["rss_mib_after"] = procs.rss_kib(started.daemon.pid) / 1024
    return rows, starts


def _check_sim(sim: procs.Simulator, accounts: list[str]) -> str:
    seen = {r["exchange_id"] for r in sim.requests() if r["path"] == CANCEL_ALL}
    missing = set(accounts) - seen
    return f"{len(missing)} accounts got no cancel-all" if missing else ""


def _curl_env(sim: procs.Simulator) -> dict[str, str]:
    return {**os.environ, **procs.SECRETS, "EMS_URL": sim.base_url}


_CURL = (
    'curl -sS --fail -o /dev/null -X POST "$EMS_URL/v1/orders/cancel/all" '
    '-H "X-CoinAPI-Key: $BENCH_COINAPI_KEY" -H "Content-Type: application/json" '
)
#: The runbook: one curl per account, one after the other.
CURL_LOOP = (
    'for a in "$@"; do ' + _CURL + '-d "{\\"exchange_id\\": \\"$a\\"}" || exit 1; done'
)
#: What a hurried engineer types instead: every account at once through xargs -P.
CURL_XARGS = (
    'printf "%s\\n" "$@" | xargs -P "$PARALLEL" -I{} '
    + _CURL
    + '-d \'{"exchange_id": "{}"}\''
)


def _run_shell(
    script: str, accounts: list[str], env: dict[str, str]
) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script, "bench", *accounts],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    problem = "" if done.returncode == 0 else done.stderr.decode()[-200:]
    return elapsed, problem


def _python_loop(sim: procs.Simulator, accounts: list[str]) -> tuple[float, str]:
    """The plain script: urllib, one blocking request per account."""
    url = sim.base_url + CANCEL_ALL
    headers = {"X-CoinAPI-Key": sim.api_key, "Content-Type": "application/json"}
    started = time.monotonic()
    for account in accounts:
        body = json.dumps({"exchange_id": account}).encode()
        request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 - our loopback URL
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - our loopback URL
            answer.read()
    return time.monotonic() - started, ""


def section_alternatives(plan: Plan, sim: procs.Simulator) -> list[dict[str, Any]]:
    """2: the same work done the way a desk would without the daemon."""
    rows: list[dict[str, Any]] = []
    curl = shutil.which("curl")
    env = _curl_env(sim)
    for n in plan.alt_sizes:
        accounts = accounts_for(n)
        for latency in plan.latencies:
            methods: dict[str, Callable[[], tuple[float, str]]] = {
                "python urllib loop": lambda a=accounts: _python_loop(sim, a),
            }
            if curl is not None:
                methods["curl, sequential loop"] = lambda a=accounts: _run_shell(
                    CURL_LOOP, a, env
                )
                methods[f"xargs -P {n} curl"] = lambda a=accounts: _run_shell(
                    CURL_XARGS, a, {**env, "PARALLEL": str(len(a))}
                )
            for name, method in methods.items():
                slow = latency > 0 and n >= HEADLINE_N and "xargs" not in name
                reps = plan.alt_slow_reps if slow else plan.alt_reps
                times: list[float] = []
                problems: set[str] = set()
                for _ in range(reps):
                    sim.reset(accounts, latency)
                    elapsed, problem = method()
                    problem = problem or _check_sim(sim, accounts)
                    if problem:
                        problems.add(problem)
                    else:
                        times.append(elapsed * 1000)
                rows.append(
                    {
                        "n": n,
                        "latency_ms": latency * 1000,
                        "method": name,
                        "reps": reps,
                        "failed_reps": reps - len(times),
                        "problems": sorted(problems)[:3],
                        "sweep_ms": summary(times),
                    }
                )
                log(
                    f"alternative N={n} D={latency * 1000:.0f}ms {name}: median "
                    f"{rows[-1]['sweep_ms']['median']:.1f} ms"
                )
            if curl is None:
                rows.append(
                    {
                        "n": n,
                        "latency_ms": latency * 1000,
                        "method": "curl (not installed: skipped)",
                        "reps": 0,
                        "failed_reps": 0,
                        "problems": [],
                        "sweep_ms": summary([]),
                    }
                )
    return rows


def section_ceiling(plan: Plan, sim: procs.Simulator) -> list[dict[str, Any]]:
    """4: a raw-socket client bursting N pre-serialized cancel-alls at the simulator."""
    rows: list[dict[str, Any]] = []
    for n in plan.sizes:
        accounts = accounts_for(n)
        requests = [
            rawhttp.cancel_all_request(f"127.0.0.1:{sim.port}", a, sim.api_key)
            for a in accounts
        ]
        for latency in plan.latencies:

            async def between(a: list[str] = accounts, d: float = latency) -> None:
                sim.reset(a, d)

            async def measure(
                reqs: list[bytes] = requests, between: Any = between
            ) -> list[float]:
                await rawhttp.burst("127.0.0.1", sim.port, reqs, 2, between)  # warm
                return await rawhttp.burst(
                    "127.0.0.1", sim.port, reqs, plan.ceiling_reps, between
                )

            timings = asyncio.run(measure())
            rows.append(
                {
                    "n": n,
                    "latency_ms": latency * 1000,
                    "reps": len(timings),
                    "burst_ms": summary([t * 1000 for t in timings]),
                }
            )
            log(
                f"ceiling N={n} D={latency * 1000:.0f}ms: median "
                f"{rows[-1]['burst_ms']['median']:.2f} ms"
            )
    return rows


def section_flood(plan: Plan, workdir: Path, sim: procs.Simulator) -> dict[str, Any]:
    """5: trigger -> wire at N = 32, D = 0, quiet and then under a 401 flood."""
    result: dict[str, Any] = {}
    with running_daemon(workdir, sim, HEADLINE_N, "flood") as started:
        for source in ("signal", "webhook"):
            trip_once(started, sim, 0.0, source)
        quiet = [
            trip_once(started, sim, 0.0, source)
            for _ in range(max(10, plan.wire_reps // 4))
            for source in ("signal", "webhook")
        ]
        flood = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("flood.py")),
                "--port",
                str(started.daemon.port),
                "--rate",
                str(plan.flood_rate),
                "--seconds",
                str(plan.flood_seconds),
            ],
            stdout=subprocess.PIPE,
        )
        loaded: list[TripSample] = []
        try:
            require(flood.stdout is not None, "flood.stdout is not None")
            ready = json.loads(flood.stdout.readline() or b"{}")
            if not ready.get("ready"):
                msg = "the flood process did not start"
                raise RuntimeError(msg)
            time.sleep(0.3)  # into the steady state
            deadline = time.monotonic() + plan.flood_seconds
            sources = ("signal", "webhook")
            while time.monotonic() < deadline - 0.5 and flood.poll() is None:
                loaded.append(trip_once(started, sim, 0.0, sources[len(loaded) % 2]))
            summary_line = flood.stdout.read().decode().strip().splitlines()
            flood.wait(timeout=30)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait(timeout=5)
            if flood.stdout is not None:
                flood.stdout.close()
        result["flood"] = json.loads(summary_line[-1]) if summary_line else {}
        result["quiet"] = {
            src: describe([s for s in quiet if s.source == src])
            for src in ("signal", "webhook")
        }
        result["quiet"]["both"] = describe(quiet)
        result["flooded"] = {
            src: describe([s for s in loaded if s.source == src])
            for src in ("signal", "webhook")
        }
        result["flooded"]["both"] = describe(loaded)
        result["rss_mib_after"] = procs.rss_kib(started.daemon.pid) / 1024
    log(
        f"flood: {result['flood'].get('sent')} requests at "
        f"{result['flood'].get('rate')}/s; wire p99 "
        f"{result['flooded']['both']['sent_to_wire_ms']['p99']:.2f} ms"
    )
    return result


def section_footprint(
    plan: Plan, workdir: Path, sim: procs.Simulator
) -> dict[str, Any]:
    """6: start -> READY, RSS after start and after many trips, CPU while idle."""
    with running_daemon(workdir, sim, HEADLINE_N, "footprint") as started:
        daemon = started.daemon
        time.sleep(2.0)  # past start-up work, as in production hours later
        cpu_before, at_before = procs.cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(plan.idle_seconds)
        cpu_after, at_after = procs.cpu_seconds(daemon.pid), time.monotonic()
        idle_pct = 100 * (cpu_after - cpu_before) / (at_after - at_before)
        rss_idle = procs.rss_kib(daemon.pid)
        log(f"footprint: idle CPU {idle_pct:.2f} % over {plan.idle_seconds:.0f} s")
        failed = 0
        began = time.monotonic()
        sources = ("signal", "webhook")
        for i in range(plan.trips):
            sample = trip_once(started, sim, 0.0, sources[i % 2])
            failed += not sample.ok
        trips_seconds = time.monotonic() - began
        time.sleep(1.0)
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        hwm = next(
            int(line.split()[1])
            for line in status.splitlines()
            if line.startswith("VmHWM:")
        )
        result = {
            "n": HEADLINE_N,
            "ready_log_s": started.ready_log_seconds,
            "ready_http_s": started.ready_http_seconds,
            "rss_mib_ready": started.rss_kib_ready / 1024,
            "rss_mib_idle": rss_idle / 1024,
            "rss_mib_after_trips": procs.rss_kib(daemon.pid) / 1024,
            "rss_mib_peak": hwm / 1024,
            "trips": plan.trips,
            "failed_trips": failed,
            "trips_seconds": trips_seconds,
            "idle_seconds": at_after - at_before,
            "idle_cpu_seconds": cpu_after - cpu_before,
            "idle_cpu_pct": idle_pct,
        }
    log(
        f"footprint: RSS {result['rss_mib_ready']:.1f} MiB at start, "
        f"{result['rss_mib_after_trips']:.1f} MiB after {plan.trips} trips"
    )
    return result


# --- the machine and the run ---------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    import aiohttp

    curl = shutil.which("curl")
    curl_version = "not installed"
    if curl is not None:
        out = subprocess.run(
            [curl, "--version"], capture_output=True, check=False, timeout=10
        )
        curl_version = out.stdout.decode().split("\n", 1)[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "curl": curl_version,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass
class Run:
    plan_name: str
    results: dict[str, Any] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and repetitions (smoke run)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="where the report goes (default BENCHMARKS.md)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results.json",
        help="where the raw figures go (default bench/results.json)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the report from the JSON of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads(args.json.read_text())
        markdown = report.render(results, REPO / "bench" / "analysis.md")
        args.markdown.write_text(markdown)
        print(markdown)
        return 0
    plan = QUICK if args.quick else FULL
    run = Run("quick" if args.quick else "full")
    began = time.monotonic()
    workdir = REPO / "var" / "bench"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    run.results["machine"] = machine()
    run.results["plan"] = plan.__dict__ | {"name": run.plan_name}
    sim = procs.Simulator(workdir).start()
    try:
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("ceiling", lambda: section_ceiling(plan, sim)),
            ("sweep", lambda: section_sweep(plan, workdir, sim)),
            ("alternatives", lambda: section_alternatives(plan, sim)),
            ("flood", lambda: section_flood(plan, workdir, sim)),
            ("footprint", lambda: section_footprint(plan, workdir, sim)),
        ]
        for name, section in sections:
            load_before = loadavg()
            log(f"{name} (load average {load_before})")
            outcome = section()
            if name == "sweep":
                run.results["sweep"], run.results["starts"] = outcome
            else:
                run.results[name] = outcome
            run.load[name] = load_before + loadavg()
    finally:
        sim.stop()
    run.results["load"] = run.load
    run.results["duration_seconds"] = round(time.monotonic() - began, 1)
    markdown = report.render(run.results, REPO / "bench" / "analysis.md")
    print(markdown)
    args.markdown.write_text(markdown)
    args.json.write_text(json.dumps(run.results, indent=1, default=str) + "\n")
    log(
        f"done in {run.results['duration_seconds']:.0f} s: {args.markdown}, {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
