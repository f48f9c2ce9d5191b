"""The EMS simulator, served on 127.0.0.1 and driven by a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from killswitch.sim import (
    DEMO_ACCOUNTS,
    RecordedRequest,
    Simulator,
    run_from_argv,
    running_simulator,
)

CANCEL_ALL = "/v1/orders/cancel/all"
KRAKEN = "KRAKEN/JOHN"
BINANCE = "BINANCE"
#: asyncio timers may fire up to a millisecond early (epoll's resolution)
TIMER_SLACK_SECONDS = 0.005
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sim() -> Simulator:
    return Simulator([KRAKEN, BINANCE], orders_per_account=3)


@pytest.fixture
async def base_url(sim: Simulator) -> AsyncIterator[str]:
    async with running_simulator(sim) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:
        yield session


async def cancel_all(
    client: aiohttp.ClientSession, exchange_id: str, *, url: str = "", **kwargs: Any
) -> tuple[int, str, bytes]:
    body = {"exchange_id": exchange_id}
    async with client.post(url + CANCEL_ALL, json=body, **kwargs) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


# --- cancel-all -------------------------------------------------------------------


async def test_cancel_all_success_empties_the_account(client, sim):
    """A cancel-all answers the documented success body and empties only that book."""
    status, content_type, body = await cancel_all(client, KRAKEN)

    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(body) == {
        "exchange_id": KRAKEN,
        "message": "Cancel all request accepted.",
    }
    assert sim.open_orders(KRAKEN) == []
    assert len(sim.open_orders(BINANCE)) == 3


async def test_cancel_all_unknown_account_is_accepted(client, sim):
    """An account the simulator was not told about is accepted and has nothing open."""
    status, _, body = await cancel_all(client, "BITSTAMP/9999")

    assert status == 200
    assert json.loads(body)["exchange_id"] == "BITSTAMP/9999"
    assert len(sim.open_orders(KRAKEN)) == 3


@pytest.mark.parametrize(
    ("raw", "errors_key"),
    [
        (b"", ""),
        (b"{not json", "$"),
        (b"{}", "exchange_id"),
        (b'{"exchange_id": ""}', "exchange_id"),
        (b'{"exchange_id": 7}', "$.exchange_id"),
        (b'["KRAKEN"]', "$"),
    ],
)
async def test_cancel_all_unusable_body_answers_validation_problem(
    client, sim, raw, errors_key
):
    """Empty, broken, incomplete or mistyped bodies get the ASP.NET 400 problem."""
    headers = {"Content-Type": "application/json"}
    async with client.post(CANCEL_ALL, data=raw, headers=headers) as response:
        body = await response.json(content_type=None)
        content_type = response.headers["Content-Type"]

    assert response.status == 400
    assert content_type.startswith("application/problem+json")
    assert set(body) == {"type", "title", "status", "traceId", "errors"}
    assert body["status"] == 400
    assert errors_key in body["errors"]
    assert len(sim.open_orders(KRAKEN)) == 3


async def test_cancel_all_without_json_content_type_answers_415(client):
    """A body not sent as JSON is refused the way ASP.NET refuses it."""
    async with client.post(CANCEL_ALL, data=b'{"exchange_id": "KRAKEN/JOHN"}') as r:
        body = await r.json(content_type=None)

    assert r.status == 415
    assert body["title"] == "Unsupported Media Type"


# --- scripted failures ------------------------------------------------------------


async def test_fail_next_490_answers_unreachable_with_the_spec_content_type(
    client, sim
):
    """A scripted 490 is an EXCHANGE_UNREACHABLE reject typed `appliction/json`."""
    sim.fail_next(KRAKEN, 1, status=490)

    status, content_type, body = await cancel_all(client, KRAKEN)
    reject = json.loads(body)

    assert (status, content_type) == (490, "appliction/json")
    assert reject["type"] == "MESSAGE_REJECT"
    assert reject["reject_reason"] == "EXCHANGE_UNREACHABLE"
    assert reject["exchange_id"] == KRAKEN
    assert json.loads(reject["rejected_message"])["exchange_id"] == KRAKEN
    assert len(sim.open_orders(KRAKEN)) == 3


async def test_fail_next_200_rejects_with_timeout_then_succeeds(client, sim):
    """N scripted 200 rejects leave the orders open; the next call cancels them."""
    sim.fail_next(KRAKEN, 2)

    first = await cancel_all(client, KRAKEN)
    second = await cancel_all(client, KRAKEN)
    assert len(sim.open_orders(KRAKEN)) == 3
    third = await cancel_all(client, KRAKEN)

    for status, _, body in (first, second):
        assert status == 200
        assert json.loads(body)["reject_reason"] == "EXCHANGE_RESPONSE_TIMEOUT"
    assert "reject_reason" not in json.loads(third[2])
    assert sim.open_orders(KRAKEN) == []


async def test_fail_next_only_affects_its_account(client, sim):
    """A scripted failure for one account leaves the others working."""
    sim.fail_next(KRAKEN, 1, status=490)

    status, _, _ = await cancel_all(client, BINANCE)

    assert status == 200
    assert sim.open_orders(BINANCE) == []


async def test_fail_next_400_answers_validation_problem(client, sim):
    """A scripted 400 carries the ASP.NET ValidationError body."""
    sim.fail_next(KRAKEN, 1, status=400)

    status, content_type, body = await cancel_all(client, KRAKEN)

    assert status == 400
    assert content_type.startswith("application/problem+json")
    assert set(json.loads(body)) == {"type", "title", "status", "traceId", "errors"}


async def test_fail_next_429_carries_retry_after(client, sim):
    """A scripted 429 tells the client to come back in a second."""
    sim.fail_next(KRAKEN, 1, status=429)

    async with client.post(CANCEL_ALL, json={"exchange_id": KRAKEN}) as response:
        await response.read()

    assert response.status == 429
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("status", "reject_reason", "content_type", "body"),
    [
        (401, None, "", b""),
        (403, None, "", b""),
        (500, None, "text/plain", b"Internal Server Error"),
        (503, None, "text/plain", b"Service Unavailable"),
        (504, "EXCHANGE_RESPONSE_TIMEOUT", "appliction/json", None),
        (503, "OTHER", "application/json", None),
    ],
)
async def test_fail_next_other_statuses_answer_their_bodies(
    client, sim, status, reject_reason, content_type, body
):
    """Auth errors are empty, 5xx are text, and a reject reason makes a reject."""
    sim.fail_next(KRAKEN, 1, status=status, reject_reason=reject_reason)

    got_status, got_type, got_body = await cancel_all(client, KRAKEN)

    assert got_status == status
    assert got_type.startswith(content_type)
    if body is None:
        assert json.loads(got_body)["reject_reason"] == reject_reason
    else:
        assert got_body == body


def test_fail_next_refuses_a_200_without_reject_reason(sim):
    """A 200 without a reject reason would be a success, so it cannot be scripted."""
    with pytest.raises(ValueError, match="reject_reason"):
        sim.fail_next(KRAKEN, 1, status=200, reject_reason=None)


# --- API key ----------------------------------------------------------------------


async def test_api_key_missing_or_wrong_answers_401_without_echoing_it(client, sim):
    """With a key configured, a request without it is refused; no key is echoed."""
    sim.api_key = "s3cret-key"

    missing = await cancel_all(client, KRAKEN)
    wrong = await cancel_all(client, KRAKEN, headers={"X-CoinAPI-Key": "guess"})

    for status, _, body in (missing, wrong):
        assert status == 401
        assert b"s3cret-key" not in body
        assert b"guess" not in body
    assert len(sim.open_orders(KRAKEN)) == 3
    assert len(sim.requests) == 2


async def test_api_key_in_header_or_query_is_accepted(client, sim):
    """The key is accepted in the X-CoinAPI-Key header and in the apikey parameter."""
    sim.api_key = "s3cret-key"

    by_header = await cancel_all(
        client, KRAKEN, headers={"X-CoinAPI-Key": "s3cret-key"}
    )
    by_query = await cancel_all(client, BINANCE, params={"apikey": "s3cret-key"})

    assert by_header[0] == by_query[0] == 200
    assert sim.open_orders(KRAKEN) == sim.open_orders(BINANCE) == []


# --- standing faults --------------------------------------------------------------


async def test_delay_adds_latency_to_every_endpoint_of_the_account(client, sim):
    """An account's delay slows its cancel-all and its order list alike."""
    sim.set_fault(KRAKEN, delay_seconds=0.1)

    started = time.monotonic()
    await cancel_all(client, KRAKEN)
    cancel_seconds = time.monotonic() - started
    started = time.monotonic()
    async with client.get("/v1/orders", params={"exchange_id": KRAKEN}) as response:
        await response.read()
    list_seconds = time.monotonic() - started

    assert cancel_seconds >= 0.1 - TIMER_SLACK_SECONDS
    assert list_seconds >= 0.1 - TIMER_SLACK_SECONDS


async def test_set_latency_delays_every_account(client, sim):
    """Global latency applies to accounts without a fault of their own."""
    sim.set_latency(0.05)

    started = time.monotonic()
    await cancel_all(client, BINANCE)

    assert time.monotonic() - started >= 0.05 - TIMER_SLACK_SECONDS


async def test_hang_never_answers_until_the_client_gives_up(client, sim):
    """A hung cancel-all ends in the client's timeout and cancels nothing."""
    sim.set_fault(KRAKEN, hang=True)

    with pytest.raises(TimeoutError):
        await cancel_all(client, KRAKEN, timeout=aiohttp.ClientTimeout(total=0.2))

    assert len(sim.open_orders(KRAKEN)) == 3
    assert [r.exchange_id for r in sim.requests] == [KRAKEN]


async def test_hang_is_cancelled_at_shutdown(sim):
    """A request still hanging when the simulator stops does not hold up shutdown."""
    sim.set_fault(KRAKEN, hang=True)
    async with aiohttp.ClientSession() as session:
        async with running_simulator(sim) as url:
            request = asyncio.create_task(cancel_all(session, KRAKEN, url=url))
            await sim.wait_for_requests(lambda requests: len(requests) == 1)
            started = time.monotonic()
        shutdown_seconds = time.monotonic() - started
        with pytest.raises(aiohttp.ClientError):
            await request

    assert shutdown_seconds < 2.0


async def test_drop_closes_the_connection_without_answering(client, sim):
    """A dropped cancel-all is a disconnect for the client and cancels nothing."""
    sim.set_fault(KRAKEN, drop=True)

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await cancel_all(client, KRAKEN)

    assert len(sim.open_orders(KRAKEN)) == 3


async def test_survive_cancels_keeps_orders_open_once_then_cancels(client, sim):
    """A surviving cancel-all answers success but the orders are still listed."""
    sim.set_fault(KRAKEN, survive_cancels=1)

    first = await cancel_all(client, KRAKEN)
    async with client.get("/v1/orders", params={"exchange_id": KRAKEN}) as response:
        still_open = await response.json()
    second = await cancel_all(client, KRAKEN)

    assert first[0] == second[0] == 200
    assert "reject_reason" not in json.loads(first[2])
    assert len(still_open) == 3
    assert sim.open_orders(KRAKEN) == []


async def test_garbage_body_is_not_json(client, sim):
    """A garbage answer is a 200 whose body does not parse, though it claims JSON."""
    sim.set_fault(KRAKEN, garbage_body=True)

    status, content_type, body = await cancel_all(client, KRAKEN)

    assert status == 200
    assert content_type.startswith("application/json")
    with pytest.raises(ValueError, match="Expecting value"):
        json.loads(body)


async def test_huge_body_is_padded_and_still_json(client, sim):
    """A huge answer is at least the asked size and still the success body."""
    sim.set_fault(KRAKEN, huge_body_bytes=200_000)

    status, _, body = await cancel_all(client, KRAKEN)

    assert status == 200
    assert len(body) >= 200_000
    assert json.loads(body)["exchange_id"] == KRAKEN


async def test_drip_sends_the_whole_body_slowly(client, sim):
    """A dripped answer takes the drip time and arrives complete."""
    sim.set_fault(KRAKEN, drip_seconds=0.1)

    started = time.monotonic()
    status, _, body = await cancel_all(client, KRAKEN)

    assert time.monotonic() - started >= 0.1 - TIMER_SLACK_SECONDS
    assert status == 200
    assert json.loads(body)["exchange_id"] == KRAKEN


async def test_set_fault_without_arguments_clears_the_account(client, sim):
    """Calling set_fault with no faults brings the account back to normal."""
    sim.set_fault(KRAKEN, drop=True)
    sim.set_fault(KRAKEN)

    status, _, _ = await cancel_all(client, KRAKEN)

    assert status == 200


# --- the other EMS paths ----------------------------------------------------------


async def test_open_orders_lists_one_account_or_all(client, sim):
    """GET /v1/orders filters by exchange_id and lists every account without it."""
    async with client.get("/v1/orders", params={"exchange_id": KRAKEN}) as response:
        one = await response.json()
    async with client.get("/v1/orders") as response:
        every = await response.json()

    assert [o["exchange_id"] for o in one] == [KRAKEN] * 3
    assert {o["exchange_id"] for o in every} == {KRAKEN, BINANCE}
    assert len(every) == 6
    required = {"amount_filled", "amount_open", "client_order_id_format_exchange"}
    for report in every:
        assert required <= set(report)
        assert (report["status"], report["order_type"]) == ("NEW", "LIMIT")


async def test_new_order_opens_and_cancel_closes_it(client, sim):
    """POST /v1/orders opens a NEW order that POST /v1/orders/cancel closes."""
    order = {
        "exchange_id": "OKX",
        "client_order_id": "client-1",
        "symbol_id_exchange": "BTC-USDT",
        "amount_order": 0.5,
        "price": 41000,
        "side": "SELL",
        "order_type": "LIMIT",
        "time_in_force": "GOOD_TILL_CANCEL",
    }
    async with client.post("/v1/orders", json=order) as response:
        opened = await response.json()
    listed = sim.open_orders("OKX")
    cancel = {"exchange_id": "OKX", "exchange_order_id": opened["exchange_order_id"]}
    async with client.post("/v1/orders/cancel", json=cancel) as response:
        cancelled = await response.json()

    assert opened["status"] == "NEW"
    assert opened["amount_open"] == 0.5
    assert [o["client_order_id"] for o in listed] == ["client-1"]
    assert cancelled["status"] == "CANCELED"
    assert sim.open_orders("OKX") == []


async def test_new_order_missing_fields_answers_validation_problem(client, sim):
    """An order without its required fields is a 400 naming each of them."""
    async with client.post("/v1/orders", json={"exchange_id": "OKX"}) as response:
        body = await response.json(content_type=None)

    assert response.status == 400
    assert {"client_order_id", "price", "side", "amount_order"} <= set(body["errors"])
    assert sim.open_orders("OKX") == []


async def test_cancel_unknown_order_answers_order_id_not_found(client):
    """Cancelling an order that is not open is a 200 ORDER_ID_NOT_FOUND reject."""
    cancel = {"exchange_id": KRAKEN, "client_order_id": "no-such-order"}
    async with client.post("/v1/orders/cancel", json=cancel) as response:
        body = await response.json()

    assert response.status == 200
    assert body["type"] == "MESSAGE_REJECT"
    assert body["reject_reason"] == "ORDER_ID_NOT_FOUND"


async def test_unknown_path_and_wrong_method_are_404_and_405(client, sim):
    """Paths and methods the spec does not document are refused, and recorded."""
    async with client.get("/v1/orders/cancel/all") as wrong_method:
        pass
    async with client.post("/v1/nothing", json={}) as unknown_path:
        pass

    assert (wrong_method.status, unknown_path.status) == (405, 404)
    assert [r.path for r in sim.requests] == ["/v1/orders/cancel/all", "/v1/nothing"]


# --- the request record -----------------------------------------------------------


async def test_request_record_is_written_before_the_delay(client, sim):
    """A request is recorded as it arrives, while its delay is still running."""
    sim.set_fault(KRAKEN, delay_seconds=0.3)
    before = time.monotonic()

    call = asyncio.create_task(cancel_all(client, KRAKEN))
    await sim.wait_for_requests(lambda requests: len(requests) == 1)
    in_flight = not call.done()
    await call

    assert in_flight
    (record,) = sim.requests
    assert isinstance(record, RecordedRequest)
    assert (record.method, record.path, record.exchange_id) == (
        "POST",
        CANCEL_ALL,
        KRAKEN,
    )
    assert before <= record.received_monotonic <= before + 0.3
    assert json.loads(record.body) == {"exchange_id": KRAKEN}
    assert record.headers["content-type"] == "application/json"


async def test_request_record_takes_exchange_id_from_the_query(client, sim):
    """A GET names its account in the query, and the control paths are not recorded."""
    async with client.get("/v1/orders", params={"exchange_id": BINANCE}):
        pass
    async with client.get("/_sim/health"):
        pass

    assert [(r.method, r.path, r.exchange_id) for r in sim.requests] == [
        ("GET", "/v1/orders", BINANCE)
    ]


async def test_wait_for_requests_times_out_with_a_bound(sim):
    """Waiting for a request that never comes ends in TimeoutError, not a hang."""
    with pytest.raises(TimeoutError, match="0 requests"):
        await sim.wait_for_requests(
            lambda requests: bool(requests), timeout_seconds=0.05
        )


def test_reset_clears_faults_and_record_and_reseeds(sim):
    """Reset forgets faults and requests and gives every account fresh orders."""
    sim.book.cancel_all(KRAKEN)
    sim.set_fault(KRAKEN, drop=True)
    sim.fail_next(KRAKEN, 3)
    sim.set_latency(1.0)
    sim.requests.append(RecordedRequest("GET", "/v1/orders", None, 0.0, {}, b""))

    sim.reset(orders_per_account=2)

    assert len(sim.open_orders(KRAKEN)) == len(sim.open_orders(BINANCE)) == 2
    assert sim.requests == []
    assert sim.faults.pop_failure(KRAKEN) is None
    assert sim.faults.delay_seconds(KRAKEN) == 0.0
    assert not sim.faults.standing(KRAKEN).drop


# --- the /_sim/ control API -------------------------------------------------------


async def test_control_faults_script_failures_faults_and_latency(client, sim):
    """POST /_sim/faults reaches fail_next, set_fault and set_latency."""
    scripts = [
        {"exchange_id": KRAKEN, "fail_next": {"n": 1, "status": 490}},
        {"exchange_id": BINANCE, "fault": {"survive_cancels": 1, "delay_seconds": 0}},
        {"latency_seconds": 0.01},
    ]
    for script in scripts:
        async with client.post("/_sim/faults", json=script) as response:
            assert await response.json() == {"ok": True}

    kraken = await cancel_all(client, KRAKEN)
    binance = await cancel_all(client, BINANCE)

    assert json.loads(kraken[2])["reject_reason"] == "EXCHANGE_UNREACHABLE"
    assert binance[0] == 200
    assert len(sim.open_orders(BINANCE)) == 3
    assert sim.faults.latency_seconds == 0.01


@pytest.mark.parametrize(
    "script",
    [
        {"exchange_id": KRAKEN, "fault": {"explode": True}},
        {"exchange_id": KRAKEN, "fault": {"hang": "yes"}},
        {"exchange_id": KRAKEN, "fault": {"delay_seconds": -1}},
        {"fail_next": {"n": 1}},
        {
            "exchange_id": KRAKEN,
            "fail_next": {"n": 1, "status": 200, "reject_reason": None},
        },
        {"latency_seconds": "fast"},
        ["not", "an", "object"],
    ],
)
async def test_control_faults_refuses_unusable_scripts(client, script):
    """A control body that cannot be applied is a 400 that says why."""
    async with client.post("/_sim/faults", json=script) as response:
        body = await response.json()

    assert response.status == 400
    assert body["ok"] is False
    assert body["error"]


async def test_control_requests_lists_the_record_with_the_key_redacted(client, sim):
    """GET /_sim/requests serialises the record and never shows the API key."""
    sim.api_key = "s3cret-key"
    await cancel_all(client, KRAKEN, headers={"X-CoinAPI-Key": "s3cret-key"})
    await cancel_all(client, BINANCE, headers={"X-CoinAPI-Key": "s3cret-key"})

    async with client.get("/_sim/requests") as response:
        text = await response.text()
    async with client.get("/_sim/requests", params={"since": "1"}) as response:
        tail = await response.json()

    records = json.loads(text)
    assert "s3cret-key" not in text
    assert [r["exchange_id"] for r in records] == [KRAKEN, BINANCE]
    assert records[0]["headers"]["X-CoinAPI-Key"] == "<redacted>"
    assert records[0]["body"] == json.dumps({"exchange_id": KRAKEN})
    assert records[0]["received_monotonic"] == sim.requests[0].received_monotonic
    assert [r["exchange_id"] for r in tail] == [BINANCE]


async def test_control_reset_and_orders_reseed_the_book(client, sim):
    """POST /_sim/reset re-seeds (optionally new accounts); /_sim/orders adds more."""
    await cancel_all(client, KRAKEN)

    async with client.post("/_sim/reset") as response:
        assert response.status == 200
    reseeded = len(sim.open_orders(KRAKEN))
    reset = {"accounts": ["OKX"], "orders_per_account": 1}
    async with client.post("/_sim/reset", json=reset) as response:
        assert response.status == 200
    async with client.post("/_sim/orders", json={"exchange_id": "OKX", "n": 4}) as r:
        added = await r.json()
    async with client.get("/_sim/health") as response:
        health = await response.json()

    assert reseeded == 3
    assert sim.open_orders(KRAKEN) == []
    assert added == {"ok": True, "exchange_id": "OKX", "open": 5}
    assert health == {"ok": True, "status": "ok", "accounts": 1, "requests": 0}


# --- the command line -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "nowhere"],
        ["--listen", "127.0.0.1:99999"],
        ["--fault", "KRAKEN:explode"],
        ["--fault", "KRAKEN:timeout"],
        ["--fault", "KRAKEN:status=abc"],
        ["--fault", "hang"],
        ["--orders-per-account", "-1"],
        ["--api-key-env", "KILLSWITCH_TEST_UNSET_VARIABLE"],
        ["--no-such-flag"],
    ],
)
def test_run_from_argv_bad_flags_exit_2(argv, capsys):
    """An unusable flag is reported on stderr with exit status 2, serving nothing."""
    assert run_from_argv(argv) == 2
    assert "error" in capsys.readouterr().err


def test_run_from_argv_defaults_to_the_demo_accounts():
    """Without --accounts, the simulator serves the eight demo accounts."""
    assert len(DEMO_ACCOUNTS) == 8
    assert "KRAKEN/JOHN" in DEMO_ACCOUNTS


def test_run_from_argv_busy_port_exits_1(capsys):
    """An address already in use is a runtime failure, reported on stderr."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        assert run_from_argv(["--listen", f"127.0.0.1:{port}"]) == 1
    assert "cannot listen" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_from_argv_serves_until_signalled_and_exits_0(signum):
    """The command prints its bound URL, applies its flags, and exits 0 on a signal."""
    code = (
        "from killswitch.sim import run_from_argv; import sys; "
        "sys.exit(run_from_argv(sys.argv[1:]))"
    )
    env = {**os.environ, "SIM_TEST_KEY": "k3y"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--listen=127.0.0.1:0",
        "--accounts=KRAKEN/JOHN,OKX",
        "--orders-per-account=2",
        "--api-key-env=SIM_TEST_KEY",
        "--fault=OKX:unreachable=1",
        "--fault=OKX:survive=1",
        "--log-requests",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("ems-sim listening on http://127.0.0.1:")
        assert line.rstrip().endswith("accounts=2")
        base_url = line.split()[3]
        headers = {"X-CoinAPI-Key": "k3y"}
        async with aiohttp.ClientSession(
            base_url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
        ) as session:
            okx = [(await cancel_all(session, "OKX"))[0] for _ in range(3)]
            async with session.get("/v1/orders", params={"exchange_id": "OKX"}) as r:
                okx_open = await r.json()
            kraken = await cancel_all(session, KRAKEN)
        logged = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()

        proc.send_signal(signum)
        returncode = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert okx == [490, 200, 200]
    assert okx_open == []
    assert kraken[0] == 200
    assert "path=/v1/orders/cancel/all" in logged
    assert "exchange_id=OKX" in logged
    assert returncode == 0
