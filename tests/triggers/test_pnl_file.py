"""PnL file watcher: real files in tmp_path, a fake Switch, injected clocks."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from killswitch.config import PnlWatcherConfig
from killswitch.errors import TriggerError
from killswitch.metrics import Metrics
from killswitch.triggers import TripRequest
from killswitch.triggers.pnl_file import PnlWatcher, PnlWatchers, parse_pnl
from tests.conftest import ACCOUNTS

DEADLINE_SECONDS = 5.0


class FakeSwitch:
    """Records trip requests; what the watcher sees of the Switch."""

    def __init__(self, accounts: tuple[str, ...] = ACCOUNTS) -> None:
        self.accounts = accounts
        self.requests: list[TripRequest] = []

    def trip(self, request: TripRequest) -> None:
        self.requests.append(request)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    """Everything a watcher is built from, owned by one test."""

    tmp_path: Path
    switch: FakeSwitch = field(default_factory=FakeSwitch)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    peaks: dict[str, float] = field(default_factory=dict)
    saves: int = 0
    clock: FakeClock = field(default_factory=lambda: FakeClock(1000.0))
    wall: FakeClock = field(default_factory=lambda: FakeClock(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry)
        self.path = self.tmp_path / "pnl.json"

    def config(self, **overrides: Any) -> PnlWatcherConfig:
        fields: dict[str, Any] = {
            "name": "desk", "path": self.path, "max_loss": 1000.0,
            "stale_after_seconds": 0.0, "unreadable_grace_seconds": 2.0,
            "poll_interval_seconds": 0.01,
        }  # fmt: skip
        fields.update(overrides)
        return PnlWatcherConfig(**fields)

    def request_save(self) -> None:
        self.saves += 1

    def watcher(self, **overrides: Any) -> PnlWatcher:
        return PnlWatcher(
            self.config(**overrides), self.switch, self.metrics, self.peaks,
            self.request_save, clock=self.clock, wall_clock=self.wall,
        )  # fmt: skip

    def write(self, content: str | bytes, path: Path | None = None) -> None:
        """Write the way risk systems do: a temporary file, then an atomic rename."""
        target = path or self.path
        data = content.encode() if isinstance(content, str) else content
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)

    def sample(self, name: str, watcher: str = "desk") -> float | None:
        return self.registry.get_sample_value(name, {"watcher": watcher})

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.switch.requests]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    """A fresh rig: fake switch, fresh registry, fake clocks."""
    return Rig(tmp_path)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll (bounded) until `condition()` holds."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# parse_pnl


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"-1234.5", -1234.5), (b"  42\n", 42.0), (b"-1e3", -1000.0), (b"+.5", 0.5)],
)
def test_parse_pnl_reads_bare_number(data: bytes, expected: float) -> None:
    """A file holding only a number is that number, without a timestamp."""
    reading = parse_pnl(data, "pnl")
    assert (reading.pnl, reading.timestamp) == (expected, None)


def test_parse_pnl_reads_json_field() -> None:
    """A JSON object holds the PnL under the configured field."""
    reading = parse_pnl(b'{"total": -12.5, "pnl": 99, "desk": "x"}', "total")
    assert (reading.pnl, reading.timestamp) == (-12.5, None)


@pytest.mark.parametrize(
    "stamp",
    [1_700_000_000, 1_700_000_000.0, "2023-11-14T22:13:20Z",
     "2023-11-14T23:13:20+01:00", "2023-11-14T22:13:20"],
)  # fmt: skip
def test_parse_pnl_reads_timestamp_epoch_or_iso(stamp: object) -> None:
    """`timestamp` is epoch seconds or ISO 8601; a naive ISO time is UTC."""
    reading = parse_pnl(json.dumps({"pnl": 1, "timestamp": stamp}).encode(), "pnl")
    assert reading.timestamp == 1_700_000_000.0


@pytest.mark.parametrize(
    "data",
    [
        b"", b"  \n", b"NaN", b"nan", b"inf", b"-Infinity", b"1e999", b"1_000",
        b"true", b"null", b"[-5]", b'"-5"', b"\xff\xfe-5", b'{"pnl": -5',
        b'{"pnl": NaN}', b'{"pnl": -Infinity}', b'{"pnl": 1e999}', b'{"pnl": true}',
        b'{"pnl": "-5"}', b'{"pnl": null}', b'{"other": -5}',
        b'{"pnl": -5, "timestamp": "yesterday"}', b'{"pnl": -5, "timestamp": false}',
        b"[" * 100_000, b"-" + b"9" * 70_000,
    ],
)  # fmt: skip
def test_parse_pnl_rejects_unusable_content(data: bytes) -> None:
    """Empty, garbled, half-written, NaN/inf, bool, wrong-typed: all TriggerError."""
    with pytest.raises(TriggerError):
        parse_pnl(data, "pnl")


# one watcher, polled by hand


async def test_watcher_bare_number_loss_trips(rig: Rig) -> None:
    """A bare number at -max_loss trips every account, source pnl, actor pnl:desk."""
    rig.write("-1000")
    watcher = rig.watcher()
    await watcher.poll()
    [request] = rig.switch.requests
    assert (request.source, request.accounts, request.actor) == (
        "pnl", None, "pnl:desk",
    )  # fmt: skip
    assert "loss limit" in request.reason


async def test_watcher_json_field_trips_only_at_the_limit(rig: Rig) -> None:
    """The JSON field is compared with -max_loss: above it nothing, at it a trip."""
    watcher = rig.watcher(field="total")
    rig.write('{"total": -999.99, "pnl": -5000}')
    await watcher.poll()
    assert rig.switch.requests == []
    rig.write('{"total": -1000}')
    await watcher.poll()
    assert len(rig.switch.requests) == 1


@pytest.mark.parametrize("iso", [False, True], ids=["epoch", "iso"])
async def test_watcher_timestamp_defines_freshness_instead_of_mtime(
    rig: Rig, iso: bool
) -> None:
    """An old `timestamp` is stale although the file is new; a new one is fresh."""
    watcher = rig.watcher(stale_after_seconds=10.0)

    def stamp(seconds: float) -> object:
        if not iso:
            return seconds
        return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))

    rig.write(json.dumps({"pnl": 5, "timestamp": stamp(rig.wall.now - 60)}))
    await watcher.poll()
    assert len(rig.switch.requests) == 1
    assert "stale" in rig.reasons[0]

    rig.write(json.dumps({"pnl": 6, "timestamp": stamp(rig.wall.now)}))
    os.utime(rig.path, (rig.wall.now - 60, rig.wall.now - 60))
    with capture_logs() as logs:
        await watcher.poll()
    assert len(rig.switch.requests) == 1
    assert [e["was"] for e in logs if e["event"] == "pnl_file_recovered"] == ["stale"]


async def test_watcher_mtime_defines_freshness_without_timestamp(rig: Rig) -> None:
    """Without a timestamp the file's mtime says how old the value is."""
    watcher = rig.watcher(stale_after_seconds=10.0)
    rig.write("5")
    os.utime(rig.path, (rig.wall.now - 11, rig.wall.now - 11))
    await watcher.poll()
    assert len(rig.switch.requests) == 1
    assert "stale" in rig.reasons[0]


async def test_watcher_stale_after_seconds_trips_once_per_episode(rig: Rig) -> None:
    """No fresh value for stale_after_seconds trips once; a fresh one re-arms it."""
    watcher = rig.watcher(stale_after_seconds=10.0)
    rig.write(json.dumps({"pnl": 5, "timestamp": rig.wall.now}))
    await watcher.poll()
    rig.wall.now += 10.0
    await watcher.poll()
    assert rig.switch.requests == []
    rig.wall.now += 0.5
    with capture_logs() as logs:
        await watcher.poll()
        await watcher.poll()
    assert len(rig.switch.requests) == 1
    assert [e["event"] for e in logs] == ["pnl_file_stale"]
    rig.write(json.dumps({"pnl": 5, "timestamp": rig.wall.now}))
    await watcher.poll()
    rig.wall.now += 11.0
    await watcher.poll()
    assert len(rig.switch.requests) == 2


async def test_watcher_stale_counts_from_start_when_nothing_was_read(rig: Rig) -> None:
    """A watcher that never read a value goes stale stale_after_seconds after start."""
    watcher = rig.watcher(stale_after_seconds=10.0, unreadable_grace_seconds=1e9)
    await watcher.poll()
    rig.wall.now += 10.5
    await watcher.poll()
    assert any("stale" in reason for reason in rig.reasons)


async def test_watcher_future_timestamp_counts_as_read_time(rig: Rig) -> None:
    """A timestamp in the future cannot keep a value fresh forever."""
    watcher = rig.watcher(stale_after_seconds=10.0)
    rig.write(json.dumps({"pnl": 5, "timestamp": rig.wall.now + 3600}))
    await watcher.poll()
    assert rig.sample("killswitch_pnl_age_seconds") == 0
    rig.wall.now += 10.5
    await watcher.poll()
    assert len(rig.switch.requests) == 1


async def test_watcher_drawdown_from_peak_trips_and_persists_peak(rig: Rig) -> None:
    """pnl <= peak - max_drawdown trips; a rising peak is saved through `peaks`."""
    watcher = rig.watcher(max_drawdown=100.0)
    for value in ("300", "500"):
        rig.write(value)
        await watcher.poll()
    assert (rig.peaks, rig.saves) == ({"desk": 500.0}, 2)
    rig.write("401")
    await watcher.poll()
    assert rig.switch.requests == []
    rig.write("400")
    await watcher.poll()
    assert len(rig.switch.requests) == 1
    assert "drawdown limit" in rig.reasons[0]
    assert (rig.peaks, rig.saves) == ({"desk": 500.0}, 2)


async def test_watcher_peak_restored_from_peaks_at_start(rig: Rig) -> None:
    """A peak already in `peaks` (restored state) counts from the first read."""
    rig.peaks["desk"] = 500.0
    rig.write("400")
    await rig.watcher(max_drawdown=100.0).poll()
    assert len(rig.switch.requests) == 1
    assert "peak 500.0" in rig.reasons[0]


async def test_watcher_stale_value_does_not_raise_peak(rig: Rig) -> None:
    """Only fresh values count toward the peak."""
    watcher = rig.watcher(max_drawdown=100.0, stale_after_seconds=10.0)
    rig.write(json.dumps({"pnl": 900, "timestamp": rig.wall.now - 60}))
    await watcher.poll()
    assert rig.peaks == {}


async def test_watcher_half_written_file_within_grace_does_not_trip(rig: Rig) -> None:
    """A half-written file is unreadable, not a loss, and trips nothing in its grace."""
    watcher = rig.watcher(unreadable_grace_seconds=2.0)
    rig.path.write_text('{"pnl": -50')
    with capture_logs() as logs:
        await watcher.poll()
        rig.clock.now += 1.9
        await watcher.poll()
    assert rig.switch.requests == []
    assert [e["event"] for e in logs] == ["pnl_file_unreadable"]
    assert rig.sample("killswitch_pnl_read_errors_total") == 1
    rig.path.write_text('{"pnl": -50000}')
    rig.clock.now += 10
    with capture_logs() as logs:
        await watcher.poll()
    [reason] = rig.reasons
    assert "loss limit" in reason
    assert logs[0]["event"] == "pnl_file_recovered"


async def test_watcher_unreadable_beyond_grace_trips_once(rig: Rig) -> None:
    """Garbage for unreadable_grace_seconds trips once, saying unreadable and why."""
    watcher = rig.watcher(unreadable_grace_seconds=2.0)
    rig.write('{"pnl": -50')
    await watcher.poll()
    rig.clock.now += 2.0
    await watcher.poll()
    await watcher.poll()
    [reason] = rig.reasons
    assert "unreadable" in reason
    assert "neither a number nor a JSON object" in reason


async def test_watcher_missing_file_trips_after_grace(rig: Rig) -> None:
    """A missing file is unreadable: a trip after the grace period, not before."""
    watcher = rig.watcher(unreadable_grace_seconds=2.0)
    await watcher.poll()
    assert rig.switch.requests == []
    rig.clock.now += 2.5
    await watcher.poll()
    [reason] = rig.reasons
    assert "unreadable" in reason
    assert "file missing" in reason


@pytest.mark.parametrize(
    "content",
    ["-inf", "NaN", '{"pnl": -Infinity}', '{"pnl": NaN}', '{"pnl": true}',
     '{"pnl": false}', "true"],
)  # fmt: skip
async def test_watcher_nan_inf_and_bool_are_unreadable_not_loss(
    rig: Rig, content: str
) -> None:
    """NaN, inf and booleans never trip as a loss, only as unreadable after grace."""
    watcher = rig.watcher()
    rig.write(content)
    await watcher.poll()
    assert rig.switch.requests == []
    rig.clock.now += 2.0
    await watcher.poll()
    [reason] = rig.reasons
    assert "unreadable" in reason
    assert "loss" not in reason


async def test_watcher_read_errors_counted_once_per_bad_version(rig: Rig) -> None:
    """An unchanged bad file counts one read error however often it is polled."""
    watcher = rig.watcher(unreadable_grace_seconds=1e9)
    assert rig.sample("killswitch_pnl_read_errors_total") == 0
    for _ in range(3):
        await watcher.poll()  # missing
    rig.write("garbage")
    for _ in range(3):
        await watcher.poll()
    rig.write("garbage")  # a new version, even with the same content
    await watcher.poll()
    assert rig.sample("killswitch_pnl_read_errors_total") == 3


async def test_watcher_breach_confirmations_ignore_one_bad_tick(rig: Rig) -> None:
    """With 2 confirmations one breaching version trips nothing; two in a row do."""
    watcher = rig.watcher(breach_confirmations=2)
    for value in ("-2000", "0", "-2000"):
        rig.write(value)
        await watcher.poll()
        await watcher.poll()  # polls of the same version are not confirmations
    assert rig.switch.requests == []
    rig.write("-2000")
    await watcher.poll()
    assert len(rig.switch.requests) == 1


async def test_watcher_retrips_only_after_the_breach_clears(rig: Rig) -> None:
    """A persisting breach trips once; it trips again only after clearing first."""
    watcher = rig.watcher()
    for value in ("-2000", "-2100", "-2200", "0", "-2000"):
        rig.write(value)
        await watcher.poll()
    assert len(rig.switch.requests) == 2


async def test_watcher_account_scope_goes_into_the_trip(rig: Rig) -> None:
    """A watcher scoped to accounts trips only those accounts."""
    rig.write("-5000")
    await rig.watcher(accounts=("BINANCE", "KRAKEN/JOHN")).poll()
    [request] = rig.switch.requests
    assert request.accounts == ("BINANCE", "KRAKEN/JOHN")


async def test_watcher_sees_atomic_rename_with_same_size_and_mtime(rig: Rig) -> None:
    """A replacement that differs only in its inode is still a new version."""
    watcher = rig.watcher()
    rig.path.write_text("100.0")
    await watcher.poll()
    await watcher.poll()  # past the one re-read after a change
    before = rig.path.stat()
    tmp = rig.tmp_path / "pnl.json.tmp"
    tmp.write_text("-2000")
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    tmp.replace(rig.path)
    after = rig.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    await watcher.poll()
    assert len(rig.switch.requests) == 1


async def test_watcher_sees_in_place_write(rig: Rig) -> None:
    """A file rewritten in place (same inode) is read again."""
    watcher = rig.watcher()
    rig.path.write_text("100")
    await watcher.poll()
    rig.path.write_text("-1000.5")
    await watcher.poll()
    assert len(rig.switch.requests) == 1


async def test_watcher_metrics_pnl_age_and_headroom(rig: Rig) -> None:
    """killswitch_pnl, _age_seconds and _headroom (nearest limit, floored at 0)."""
    watcher = rig.watcher(max_loss=1000.0, max_drawdown=300.0)
    rig.write(json.dumps({"pnl": -900, "timestamp": rig.wall.now - 5}))
    await watcher.poll()
    assert rig.sample("killswitch_pnl") == -900
    assert rig.sample("killswitch_pnl_age_seconds") == pytest.approx(5)
    assert rig.sample("killswitch_pnl_headroom") == 100  # the loss limit is nearest
    rig.wall.now += 2
    await watcher.poll()
    assert rig.sample("killswitch_pnl_age_seconds") == pytest.approx(7)
    rig.write("500")
    await watcher.poll()
    assert rig.sample("killswitch_pnl_headroom") == 300  # the drawdown limit is
    rig.write("250")
    await watcher.poll()
    assert rig.sample("killswitch_pnl_headroom") == 50
    assert rig.switch.requests == []
    rig.write("-1500")
    await watcher.poll()
    assert rig.sample("killswitch_pnl_headroom") == 0


async def test_watcher_reset_retrips_a_loss_that_persists(rig: Rig) -> None:
    """After a reset the current file is judged afresh: a loss still there trips."""
    watcher = rig.watcher()
    rig.write("-5000")
    await watcher.poll()
    await watcher.poll()
    watcher.reset()
    await watcher.poll()
    assert len(rig.switch.requests) == 2


# the supervisor, running for real


def run_watchers(
    rig: Rig, configs: Callable[[], tuple[PnlWatcherConfig, ...]]
) -> PnlWatchers:
    return PnlWatchers(
        configs, rig.switch, rig.metrics, rig.peaks, rig.request_save,
        clock=rig.clock, wall_clock=rig.wall,
    )  # fmt: skip


async def test_watchers_run_one_task_per_file(rig: Rig) -> None:
    """Several watchers run side by side, each on its own file and limits."""
    a, b = rig.config(name="a"), rig.config(name="b", path=rig.tmp_path / "b.json")
    rig.write("-5000")
    rig.write("-50", b.path)
    watchers = run_watchers(rig, lambda: (a, replace(b, max_loss=10.0)))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watchers.run())
        await wait_until(lambda: len(rig.switch.requests) == 2)
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {"trigger.pnl.a", "trigger.pnl.b"} <= names
        task.cancel()
    assert sorted(r.actor or "" for r in rig.switch.requests) == ["pnl:a", "pnl:b"]


async def test_watchers_reset_clears_peak_in_scope_only(rig: Rig) -> None:
    """A reset clears the peak of watchers covering the accounts, and saves."""
    a = rig.config(name="a", max_drawdown=100.0, accounts=("BINANCE",))
    b = rig.config(name="b", max_drawdown=100.0, accounts=("COINBASE",))
    rig.peaks.update(a=900.0, b=900.0)
    rig.write("500")
    watchers = run_watchers(rig, lambda: (a, b))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watchers.run())
        await wait_until(lambda: len(rig.switch.requests) == 2)
        saves = rig.saves
        watchers.on_reset(["BINANCE"])
        assert rig.peaks == {"b": 900.0}
        assert rig.saves == saves + 1
        # the current value is the new peak; no drawdown from the old one
        await wait_until(lambda: rig.peaks.get("a") == 500.0)
        rig.write("450")
        await wait_until(lambda: rig.sample("killswitch_pnl", "a") == 450)
        task.cancel()
    assert sorted(r.actor or "" for r in rig.switch.requests) == ["pnl:a", "pnl:b"]


async def test_watchers_reload_restarts_with_new_limits(rig: Rig) -> None:
    """reload() restarts every watcher with the configs of now; peaks survive."""
    configs = [rig.config(max_loss=1000.0, max_drawdown=5000.0)]
    rig.write("-500")
    watchers = run_watchers(rig, lambda: tuple(configs))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watchers.run())
        await wait_until(lambda: rig.sample("killswitch_pnl") == -500)
        assert rig.switch.requests == []
        configs[0] = replace(configs[0], max_loss=400.0)
        old = watchers.watchers["desk"]
        watchers.reload()
        await wait_until(lambda: len(rig.switch.requests) == 1)
        assert watchers.watchers["desk"] is not old
        assert rig.peaks == {"desk": -500.0}
        task.cancel()
    assert "max_loss 400.0" in rig.reasons[0]


# property: garbage is never a loss


_ANY_BYTES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32).map(str.encode),
    st.floats().map(lambda f: repr(f).encode()),
    st.floats().map(lambda f: json.dumps({"pnl": f}).encode()),
    st.sampled_from([b"-1000", b"-1e3", b'{"pnl": -5000}', b'{"pnl": -1e400}', b"-"]),
)


@settings(max_examples=150, deadline=None)
@given(data=_ANY_BYTES)
async def test_watcher_arbitrary_bytes_never_a_false_loss(data: bytes) -> None:
    """Any bytes: no crash; a loss trip only when they parse as a breaching number."""
    try:
        pnl: float | None = parse_pnl(data, "pnl").pnl
    except TriggerError:
        pnl = None
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp))
        rig.write(data)
        watcher = rig.watcher(unreadable_grace_seconds=2.0)
        await watcher.poll()
        await watcher.poll()
        if pnl is None:
            assert rig.switch.requests == []
            assert rig.sample("killswitch_pnl_read_errors_total") == 1
            rig.clock.now += 2.0
            await watcher.poll()
            [reason] = rig.reasons
            assert "unreadable" in reason
        elif pnl <= -1000:
            [reason] = rig.reasons
            assert "loss limit" in reason
        else:
            assert rig.switch.requests == []
