"""sd_notify: the real daemon's READY/STATUS/WATCHDOG/RELOADING/STOPPING on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from killswitch.notify import Notifier
from tests.conftest import ACCOUNTS, RunningSim
from tests.processes import DaemonProcess, write_config

WAIT_SECONDS = 10.0
# Longest AF_UNIX path (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH_BYTES = 107
WATCHDOG_USEC = 400_000
PINGS_WANTED = 5


def fields(message: str) -> dict[str, str]:
    """An sd_notify datagram as KEY -> VALUE."""
    return dict(line.split("=", 1) for line in message.splitlines() if line)


class NotifyListener:
    """The systemd side: a bound AF_UNIX datagram socket that collects messages."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as NOTIFY_SOCKET spells it
        self.messages: list[str] = []
        sock.setblocking(False)

    async def wait_for(
        self,
        predicate: Callable[[list[str]], bool],
        timeout_seconds: float = WAIT_SECONDS,
    ) -> list[str]:
        """Receive (bounded) until `predicate(messages)` holds; return the messages."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_seconds):
                while not predicate(self.messages):
                    data = await loop.sock_recv(self.sock, 4096)
                    self.messages.append(data.decode())
        except TimeoutError:
            msg = f"not received within {timeout_seconds}s; got {self.messages}"
            raise AssertionError(msg) from None
        return self.messages

    def drain(self) -> list[str]:
        """Whatever is queued on the socket now, without waiting or yielding."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        self.messages += received
        return received

    def count(self, prefix: str) -> int:
        """How many messages so far start with `prefix`."""
        return sum(m.startswith(prefix) for m in self.messages)

    def index(self, predicate: Callable[[dict[str, str]], bool], start: int = 0) -> int:
        """Index of the first message at or after `start` whose fields match."""
        for i, message in enumerate(self.messages[start:], start):
            if predicate(fields(message)):
                return i
        msg = f"no such message after #{start} in {self.messages}"
        raise AssertionError(msg)


@contextlib.contextmanager
def bound_listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A listener on notify.sock in tmp_path, or in a shorter directory if too long."""
    short: Path | None = None
    directory = tmp_path
    if len(os.fsencode(tmp_path / "notify.sock")) > MAX_SOCKET_PATH_BYTES:
        directory = short = Path(tempfile.mkdtemp(prefix="ks-notify-"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            path = str(directory / "notify.sock")
            sock.bind(path)
            yield NotifyListener(sock, path)
    finally:
        if short is not None:
            shutil.rmtree(short)


@contextlib.contextmanager
def abstract_listener() -> Iterator[NotifyListener]:
    """A listener on a unique abstract address, given to the daemon as `@name`."""
    name = f"killswitch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifyListener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET listener: a socket file in tmp_path, or an abstract `@name`."""
    with (
        bound_listener(tmp_path)
        if request.param == "path"
        else abstract_listener() as lis
    ):
        yield lis


@pytest.fixture
async def notified_daemon(
    ems_sim: RunningSim,
    tmp_path: Path,
    listener: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[DaemonProcess]:
    """The real daemon with NOTIFY_SOCKET and WATCHDOG_USEC, as systemd sets them."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config_path = tmp_path / "killswitch.yaml"
    write_config(config_path, ems_sim.base_url, ACCOUNTS)
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    daemon = DaemonProcess(config_path, env=env).start()
    try:
        yield daemon
    finally:
        daemon.stop()


async def test_notify_daemon_reports_its_lifecycle_to_systemd(
    notified_daemon: DaemonProcess, listener: NotifyListener
):
    """READY after listening, pings, STATUS on a trip, RELOADING/READY, STOPPING."""
    daemon = notified_daemon
    [ready] = await listener.wait_for(lambda m: len(m) >= 1)
    assert fields(ready)["READY"] == "1"
    assert fields(ready)["STATUS"] == f"armed: {len(ACCOUNTS)} accounts"
    status, _ = await daemon.request("GET", "/healthz")  # listening before READY=1
    assert status == 200

    await listener.wait_for(lambda _: listener.count("WATCHDOG=1") >= PINGS_WANTED)

    daemon.send(signal.SIGUSR1)
    tripped_words = f"tripped: {', '.join(ACCOUNTS)}"
    await listener.wait_for(
        lambda m: any(fields(x).get("STATUS") == tripped_words for x in m)
    )
    first_status = listener.index(
        lambda f: f.get("STATUS", "").startswith(("tripped: ", "sweeping: "))
    )

    pings_before_reload = listener.count("WATCHDOG=1")
    daemon.send(signal.SIGHUP)
    await daemon.wait_for_event("config_reloaded")
    await listener.wait_for(lambda m: any(fields(x).get("RELOADING") for x in m))
    reloading = listener.index(lambda f: f.get("RELOADING") == "1")
    monotonic_usec = int(fields(listener.messages[reloading])["MONOTONIC_USEC"])
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - monotonic_usec < WAIT_SECONDS * 1_000_000
    await listener.wait_for(
        lambda m: sum(fields(x).get("READY") == "1" for x in m) == 2
    )
    ready_again = listener.index(lambda f: f.get("READY") == "1", reloading)
    await listener.wait_for(
        lambda _: listener.count("WATCHDOG=1") >= pings_before_reload + 2
    )

    daemon.send(signal.SIGTERM)
    await listener.wait_for(lambda m: any("STOPPING=1" in x for x in m))
    assert await daemon.wait_exit() == 0
    listener.drain()
    stopping = listener.index(lambda f: f.get("STOPPING") == "1")
    assert 0 < first_status < reloading < ready_again < stopping
    assert listener.messages[stopping + 1 :] == [], "nothing after STOPPING=1"


async def test_notify_watchdog_pings_stop_while_the_event_loop_is_blocked(
    tmp_path: Path,
):
    """WATCHDOG=1 comes from the event loop: a loop blocked 6 intervals sends none."""
    with bound_listener(tmp_path) as listener:
        notifier = Notifier(
            {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "100000"}
        )
        interval = notifier.watchdog_interval_seconds
        assert interval == 0.05
        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(notifier.run(lambda: "armed"), name="notify")
                await listener.wait_for(lambda _: listener.count("WATCHDOG=1") >= 2)
                listener.drain()
                time.sleep(6 * interval)  # blocks the event loop on purpose
                assert listener.drain() == [], "a ping came while the loop was blocked"
                pings = listener.count("WATCHDOG=1")
                await listener.wait_for(lambda _: listener.count("WATCHDOG=1") > pings)
                task.cancel()
        finally:
            notifier.close()


def test_notify_without_notify_socket_does_nothing():
    """Not started by systemd: disabled, no watchdog, and sending is a no-op."""
    notifier = Notifier({})
    assert not notifier.is_enabled
    assert notifier.watchdog_interval_seconds is None
    notifier.ready("armed")
    notifier.notify("WATCHDOG=1")
    notifier.close()


async def test_notify_run_returns_at_once_without_notify_socket():
    """The watchdog task ends immediately when systemd did not ask for it."""
    async with asyncio.timeout(1.0):
        await Notifier({}).run(lambda: "armed")


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_notify_watchdog_interval_is_half_of_watchdog_usec_when_ours(
    environ: dict[str, str], interval: float | None
):
    """Ping at half WATCHDOG_USEC, and only when WATCHDOG_PID is unset or ours."""
    assert Notifier(environ).watchdog_interval_seconds == interval


async def test_notify_status_is_sent_only_when_it_changes(tmp_path: Path):
    """STATUS= goes out once per change; READY's status counts as already sent."""
    with bound_listener(tmp_path) as listener:
        notifier = Notifier({"NOTIFY_SOCKET": listener.address})
        notifier.ready("armed: 2 accounts")
        notifier.status("armed: 2 accounts")
        notifier.status("tripped: A")
        notifier.status("tripped: A")
        notifier.stopping()
        notifier.close()
        assert listener.drain() == [
            "READY=1\nSTATUS=armed: 2 accounts",
            "STATUS=tripped: A",
            "STOPPING=1\nSTATUS=stopping",
        ]


def test_notify_failure_is_logged_once_until_a_send_works(tmp_path: Path):
    """A missing systemd socket is logged once, not at every ping, and recovery too."""
    with bound_listener(tmp_path) as listener:
        missing = listener.address + ".gone"
        notifier = Notifier({"NOTIFY_SOCKET": missing})
        try:
            with capture_logs() as logs:
                for _ in range(5):
                    notifier.notify("WATCHDOG=1")
                notifier._address = listener.address  # systemd is back
                notifier.notify("WATCHDOG=1")
        finally:
            notifier.close()
        assert [e["event"] for e in logs] == ["sd_notify_failed", "sd_notify_recovered"]
        assert listener.drain() == ["WATCHDOG=1"]
