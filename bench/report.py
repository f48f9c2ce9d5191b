"""Render the benchmark's results as the Markdown of BENCHMARKS.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

HEADLINE_N = 32
HEADLINE_D_MS = 50.0


def _ms(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "> max bucket"
    return f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "PASS" if ok else "**MISS**"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _fmt_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _daemon_median(sweep: list[dict[str, Any]], n: int, d: float) -> float:
    """The slower trigger's median: the daemon's figure in every ratio."""
    medians = [
        r["sweep_ms"]["median"]
        for r in sweep
        if r["n"] == n and r["latency_ms"] == d and r["sweep_ms"]["n"]
    ]
    return max(medians) if medians else math.nan


def targets(results: dict[str, Any]) -> list[list[str]]:
    """The issue's targets: what, target, measured, PASS/MISS."""
    rows: list[list[str]] = []
    sweep = results.get("sweep", [])
    d = HEADLINE_D_MS
    for trigger in ("signal", "webhook"):
        row = _find(sweep, n=HEADLINE_N, latency_ms=d, trigger=trigger)
        if row is not None:
            median = row["sweep_ms"]["median"]
            rows.append(
                [
                    f"N=32, D=50 ms: median sweep ({trigger})",
                    f"<= {1.15 * d:.1f} ms (1.15 x D)",
                    f"{_ms(median)} ms ({median / d:.3f} x D)",
                    _verdict(median <= 1.15 * d),
                ]
            )
    daemon = _daemon_median(sweep, HEADLINE_N, d)
    alternatives = results.get("alternatives", [])
    for label, needle, factor in (
        ("sequential curl loop", "curl, sequential loop", 30),
        ("xargs -P curl", "xargs -P", 4),
    ):
        alt = next(
            (
                r
                for r in alternatives
                if r["n"] == HEADLINE_N
                and r["latency_ms"] == d
                and r["method"].startswith(needle)
                and r["sweep_ms"]["n"]
            ),
            None,
        )
        if alt is None:
            rows.append(
                [f"N=32, D=50 ms: vs {label}", f">= {factor}x faster", "n/a", "n/a"]
            )
            continue
        ratio = alt["sweep_ms"]["median"] / daemon
        rows.append(
            [
                f"N=32, D=50 ms: faster than the {label}",
                f">= {factor}x",
                f"{ratio:.1f}x ({_ms(alt['sweep_ms']['median'], 1)} ms vs "
                f"{_ms(daemon)} ms)",
                _verdict(ratio >= factor),
            ]
        )
    wire_rows = [r for r in sweep if r["n"] == HEADLINE_N and r["latency_ms"] == 0]
    for key, label in (
        ("wire_ms", "daemon's own wire_ms (seen -> written)"),
        ("sent_to_wire_ms", "sent -> written (daemon's write stamp)"),
        ("sim_wire_ms", "sent -> received by the EMS (simulator's stamp)"),
    ):
        if not wire_rows:
            break
        p50 = max(r[key]["median"] for r in wire_rows)
        p99 = max(r[key]["p99"] for r in wire_rows)
        rows.append(
            [f"N=32, D=0: trigger -> wire p50, {label}", "<= 5 ms", f"{_ms(p50)} ms",
             _verdict(p50 <= 5)]
        )  # fmt: skip
        rows.append(
            [f"N=32, D=0: trigger -> wire p99, {label}", "<= 10 ms", f"{_ms(p99)} ms",
             _verdict(p99 <= 10)]
        )  # fmt: skip
    flood = results.get("flood")
    if flood:
        for key, label in (
            ("sent_to_wire_ms", "sent -> written"),
            ("sim_wire_ms", "sent -> received by the EMS"),
        ):
            loaded = flood["flooded"]["both"][key]["p99"]
            quiet = flood["quiet"]["both"][key]["p99"]
            rows.append(
                [
                    f"under a {flood['flood'].get('rate', '?')}/s 401 flood: trigger "
                    f"-> wire p99, {label}",
                    "<= 20 ms (2 x 10 ms)",
                    f"{_ms(loaded)} ms (quiet: {_ms(quiet)} ms)",
                    _verdict(loaded <= 20),
                ]
            )
    foot = results.get("footprint")
    if foot:
        rows.append(
            [f"idle CPU ({foot['idle_seconds']:.0f} s, PnL watcher at 0.25 s)",
             "<= 1 % of a core", f"{foot['idle_cpu_pct']:.2f} %",
             _verdict(foot["idle_cpu_pct"] <= 1)]
        )  # fmt: skip
        worst = max(foot["rss_mib_ready"], foot["rss_mib_after_trips"])
        rows.append(
            [
                f"RSS after start / after {foot['trips']} trips",
                "<= 80 MiB",
                f"{foot['rss_mib_ready']:.1f} / {foot['rss_mib_after_trips']:.1f} MiB",
                _verdict(worst <= 80),
            ]
        )
    starts = [s["ready_http_s"] for s in results.get("starts", [])]
    if foot:
        starts.append(foot["ready_http_s"])
    if starts:
        rows.append(
            ["start -> READY (spawn -> /readyz 200), worst of "
             f"{len(starts)} starts", "<= 1.5 s", f"{max(starts):.3f} s",
             _verdict(max(starts) <= 1.5)]
        )  # fmt: skip
    return rows


def render(results: dict[str, Any], analysis: Path) -> str:
    m = results["machine"]
    plan = results["plan"]
    out: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`"
        + (" --quick" if plan["name"] == "quick" else "")
        + f"), {results['duration_seconds']:.0f} s. The EMS simulator and the real "
        "daemon run on loopback; every time below is CLOCK_MONOTONIC, shared by the "
        "processes. Raw figures: `bench/results.json`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}, aiohttp {m['aiohttp']}, {m['curl']}; "
        f"{m['date']}.",
        "",
        "Load average (1, 5, 15 min) before each section: "
        + "; ".join(
            f"{name} {values[:3]}" for name, values in results.get("load", {}).items()
        )
        + ". Other work on the machine shows up as noise, mostly in the p99s.",
        "",
        "Daemon config: production settings (`log: {format: json, level: info}` to a "
        "pipe as under journald, `sweep.verify: true`, retries on, an API key, a PnL "
        "watcher polling every 0.25 s), except `resweep_interval_seconds: 0` so that "
        "no background re-sweep overlaps a measured trip. Between repetitions: "
        "simulator reset (fresh orders), `POST /v1/reset`, "
        "30 ms pause. Sweep = trigger sent -> the last account's cancel-all answered "
        "(the daemon's `cancelled_monotonic`); the signal is sent with `os.kill`, the "
        "webhook written by a pre-opened keep-alive client with the request already "
        "serialized.",
        "",
        "## Targets",
        "",
    ]
    out += _fmt_table(["target", "goal", "measured", ""], targets(results))
    out += ["", "## 1. Sweep time (trigger sent -> last cancel-all answered), ms", ""]
    rows = []
    for r in results.get("sweep", []):
        s = r["sweep_ms"]
        d = r["latency_ms"]
        rows.append(
            [
                str(r["n"]),
                f"{d:.0f}",
                r["trigger"],
                str(r["reps"] - r["failed_reps"])
                + (f" ({r['failed_reps']} failed)" if r["failed_reps"] else ""),
                _ms(s["median"]),
                _ms(s["p95"]),
                _ms(s["p99"]),
                f"{s['median'] / d:.3f}" if d else "",
            ]
        )
    out += _fmt_table(
        ["N", "D ms", "trigger", "reps", "median", "p95", "p99", "median / D"], rows
    )
    out += [
        "",
        "## 2. The alternatives, measured the same way (start -> last cancel answered)",
        "",
        "Each alternative starts from scratch as it would in an incident: the curl "
        "variants spawn `bash` and one `curl` per account (a new connection each); "
        "the Python loop runs in the benchmark's own, already started interpreter "
        "(no start-up cost counted), one `urllib` request per account. The ratio "
        "divides by the daemon's slower trigger at the same N and D.",
        "",
    ]
    rows = []
    sweep = results.get("sweep", [])
    ceiling = results.get("ceiling", [])
    for n in sorted({r["n"] for r in results.get("alternatives", [])}):
        for d in sorted({r["latency_ms"] for r in results.get("alternatives", [])}):
            daemon = _daemon_median(sweep, n, d)
            floor = _find(ceiling, n=n, latency_ms=d)
            rows.append([str(n), f"{d:.0f}", "floor: D itself", "", _ms(d), "", ""])
            if floor is not None:
                f = floor["burst_ms"]["median"]
                rows.append(
                    [str(n), f"{d:.0f}", "raw-socket burst (section 4)",
                     str(floor["reps"]), _ms(f), _ms(floor["burst_ms"]["p95"]),
                     f"{f / daemon:.2f}x"]
                )  # fmt: skip
            rows.append(
                [str(n), f"{d:.0f}", "**killswitch daemon** (slower trigger)", "",
                 _ms(daemon), "", "1x"]
            )  # fmt: skip
            for r in results.get("alternatives", []):
                if r["n"] != n or r["latency_ms"] != d:
                    continue
                s = r["sweep_ms"]
                ratio = s["median"] / daemon if s["n"] else math.nan
                rows.append(
                    [str(n), f"{d:.0f}", r["method"], str(s["n"]), _ms(s["median"], 1),
                     _ms(s["p95"], 1), "n/a" if math.isnan(ratio) else f"{ratio:.1f}x"]
                )  # fmt: skip
    out += _fmt_table(
        ["N", "D ms", "how", "reps", "median ms", "p95 ms", "vs daemon"], rows
    )
    out += [
        "",
        "## 3. Trigger -> wire at N = 32, D = 0, ms",
        "",
        "`wire_ms`: the daemon's own figure (trigger seen -> last first-attempt "
        "cancel-all written), also in `killswitch_trigger_to_wire_seconds` (bucket "
        "upper bounds shown). `sent -> seen`: signal delivery or HTTP request "
        "parsing. `sent -> written`: the bench's send time to the daemon's last "
        "write. `sent -> EMS`: independently, to the simulator's receive stamp of "
        "the last account's first cancel-all.",
        "",
    ]
    rows = []
    for r in sweep:
        if r["n"] != HEADLINE_N or r["latency_ms"] != 0:
            continue
        rows.append(
            [
                r["trigger"],
                str(r["reps"] - r["failed_reps"]),
                f"{_ms(r['wire_ms']['median'])} / {_ms(r['wire_ms']['p99'])}",
                f"<= {_ms(r['histogram_p50_le_ms'], 1)} / "
                f"<= {_ms(r['histogram_p99_le_ms'], 1)}",
                f"{_ms(r['sent_to_seen_ms']['median'])} / "
                f"{_ms(r['sent_to_seen_ms']['p99'])}",
                f"{_ms(r['sent_to_wire_ms']['median'])} / "
                f"{_ms(r['sent_to_wire_ms']['p99'])}",
                f"{_ms(r['sim_wire_ms']['median'])} / {_ms(r['sim_wire_ms']['p99'])}",
            ]
        )
    out += _fmt_table(
        ["trigger", "reps", "wire_ms p50 / p99", "histogram p50 / p99",
         "sent -> seen p50 / p99", "sent -> written p50 / p99",
         "sent -> EMS p50 / p99"],
        rows,
    )  # fmt: skip
    out += [
        "",
        "## 4. The simulator's ceiling",
        "",
        "A minimal client (raw asyncio sockets, N connections opened beforehand, "
        "requests serialized beforehand) writes N cancel-alls at once; time until "
        "the last answer is read. Nothing can beat this against this simulator on "
        "this machine.",
        "",
    ]
    rows = []
    for r in ceiling:
        b = r["burst_ms"]
        d = r["latency_ms"]
        rows.append(
            [str(r["n"]), f"{d:.0f}", str(r["reps"]), _ms(b["median"]), _ms(b["p95"]),
             _ms(b["p99"]), f"{b['median'] / d:.3f}" if d else ""]
        )  # fmt: skip
    out += _fmt_table(["N", "D ms", "reps", "median", "p95", "p99", "median / D"], rows)
    flood = results.get("flood")
    if flood:
        f = flood["flood"]
        out += [
            "",
            "## 5. Under load: trigger -> wire, N = 32, D = 0, during a 401 flood",
            "",
            f"A separate process sent {f.get('sent')} unauthenticated `POST /v1/trip` "
            f"over 8 keep-alive connections in {f.get('seconds')} s ({f.get('rate')}/s"
            f"; answers by status: {f.get('statuses')}; {f.get('skipped', 0)} not "
            "sent because 5 were already waiting on a connection), while the bench "
            "tripped the daemon (signal and webhook alternately, reset between). "
            "Quiet: the same daemon just before the flood.",
            "",
        ]
        rows = []
        for phase in ("quiet", "flooded"):
            for source in ("signal", "webhook", "both"):
                r = flood[phase][source]
                rows.append(
                    [phase, source, str(r["reps"] - r["failed_reps"]),
                     f"{_ms(r['wire_ms']['median'])} / {_ms(r['wire_ms']['p99'])}",
                     f"{_ms(r['sent_to_wire_ms']['median'])} / "
                     f"{_ms(r['sent_to_wire_ms']['p99'])}",
                     f"{_ms(r['sim_wire_ms']['median'])} / "
                     f"{_ms(r['sim_wire_ms']['p99'])}"]
                )  # fmt: skip
        out += _fmt_table(
            ["phase", "trigger", "reps", "wire_ms p50 / p99",
             "sent -> written p50 / p99", "sent -> EMS p50 / p99"],
            rows,
        )  # fmt: skip
    foot = results.get("footprint")
    if foot:
        out += [
            "",
            "## 6. Footprint",
            "",
        ]
        rows = []
        for s in results.get("starts", []):
            rows.append(
                [f"sweep daemon, N={s['n']}", f"{s['ready_log_s']:.3f}",
                 f"{s['ready_http_s']:.3f}", f"{s['rss_mib_ready']:.1f}",
                 f"{s.get('rss_mib_after', math.nan):.1f}",
                 _ms(s["cold_trip"]["sweep_ms"]), _ms(s["cold_trip"]["wire_ms"])]
            )  # fmt: skip
        rows.append(
            [f"footprint daemon, N={foot['n']}", f"{foot['ready_log_s']:.3f}",
             f"{foot['ready_http_s']:.3f}", f"{foot['rss_mib_ready']:.1f}",
             f"{foot['rss_mib_after_trips']:.1f} (peak {foot['rss_mib_peak']:.1f})",
             "", ""]
        )  # fmt: skip
        out += _fmt_table(
            ["daemon", "spawn -> daemon_ready s", "spawn -> /readyz 200 s",
             "RSS at READY MiB", "RSS at the end MiB", "first trip: sweep ms",
             "first trip: wire_ms"],
            rows,
        )  # fmt: skip
        out += [
            "",
            f"Idle: {foot['idle_cpu_seconds']:.2f} s of CPU in "
            f"{foot['idle_seconds']:.1f} s = **{foot['idle_cpu_pct']:.2f} %** of one "
            "core (utime + stime from /proc/PID/stat; N = 32, one PnL watcher polling "
            "every 0.25 s, keep-warm probes every 5 s). Then "
            f"{foot['trips']} trips (signal and webhook alternately, each followed by "
            f"a reset) in {foot['trips_seconds']:.0f} s, "
            f"{foot['failed_trips']} failed; "
            f"RSS {foot['rss_mib_idle']:.1f} MiB before them, "
            f"{foot['rss_mib_after_trips']:.1f} MiB after.",
        ]
    if analysis.exists():
        out += ["", analysis.read_text().rstrip()]
    return "\n".join(out) + "\n"
