"""EmsClient against the real simulator: every row of SPEC's classification table."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aioresponses import aioresponses

from killswitch.config import AccountConfig, EmsConfig
from killswitch.ems import EmsClient, classify
from killswitch.errors import EmsRejectedError, EmsUnavailableError
from tests.conftest import API_KEY, RunningSim

ACCOUNT = "KRAKEN/JOHN"


async def test_cancel_all_accepted_sends_spec_request_and_empties_book(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A 200 without a reject is accepted; the request is exactly SPEC's shape."""
    ack = await client.cancel_all(ACCOUNT)
    assert ack.exchange_id == ACCOUNT
    assert ack.status == 200
    [req] = ems_sim.sim.requests
    assert (req.method, req.path) == ("POST", "/v1/orders/cancel/all")
    assert json.loads(req.body) == {"exchange_id": ACCOUNT}
    assert req.headers["X-CoinAPI-Key"] == API_KEY
    assert req.headers["Content-Type"] == "application/json"
    assert ems_sim.sim.open_orders(ACCOUNT) == []


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [
        (200, "EXCHANGE_RESPONSE_TIMEOUT", "retryable_reject"),
        (200, "EXCHANGE_UNREACHABLE", "retryable_reject"),
        (490, "EXCHANGE_UNREACHABLE", "retryable_reject"),
        (490, None, "retryable_reject"),
        (504, "EXCHANGE_RESPONSE_TIMEOUT", "retryable_reject"),
        (500, None, "http_error"),
        (502, None, "http_error"),
        (503, None, "http_error"),
        (504, None, "http_error"),
        (429, None, "http_error"),
    ],
)
async def test_cancel_all_transient_answers_raise_unavailable(
    ems_sim: RunningSim,
    client: EmsClient,
    status: int,
    reason: str | None,
    outcome: str,
) -> None:
    """Retryable rows of the table raise EmsUnavailableError with the right outcome."""
    ems_sim.sim.fail_next(ACCOUNT, 1, status=status, reject_reason=reason)
    with pytest.raises(EmsUnavailableError) as info:
        await client.cancel_all(ACCOUNT)
    assert info.value.outcome == outcome
    assert info.value.exchange_id == ACCOUNT


async def test_cancel_all_429_carries_retry_after(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A 429's Retry-After is handed to the retry policy."""
    ems_sim.sim.fail_next(ACCOUNT, 1, status=429, reject_reason=None)
    with pytest.raises(EmsUnavailableError) as info:
        await client.cancel_all(ACCOUNT)
    assert info.value.retry_after_seconds == 1.0


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [
        (200, "OTHER", "rejected"),
        (200, "JSON_ERROR", "rejected"),
        (200, "INVALID_TYPE", "rejected"),
        (200, "METHOD_NOT_SUPPORTED", "rejected"),
        (200, "ORDER_ID_NOT_FOUND", "rejected"),
        (400, None, "rejected"),
        (401, None, "auth_error"),
        (403, None, "auth_error"),
    ],
)
async def test_cancel_all_final_answers_raise_rejected(
    ems_sim: RunningSim,
    client: EmsClient,
    status: int,
    reason: str | None,
    outcome: str,
) -> None:
    """Non-retryable rows of the table raise EmsRejectedError with the right outcome."""
    ems_sim.sim.fail_next(ACCOUNT, 1, status=status, reject_reason=reason)
    with pytest.raises(EmsRejectedError) as info:
        await client.cancel_all(ACCOUNT)
    assert info.value.outcome == outcome
    assert info.value.reject_reason == reason


async def test_cancel_all_wrong_api_key_is_auth_error(
    ems_sim: RunningSim, session: aiohttp.ClientSession
) -> None:
    """The simulator's own key check answers 401, classified auth_error."""
    ems = {
        "default": EmsConfig(name="default", base_url=ems_sim.base_url, api_key="wrong")
    }
    client = EmsClient(session, ems, (AccountConfig(exchange_id=ACCOUNT),))
    with pytest.raises(EmsRejectedError) as info:
        await client.cancel_all(ACCOUNT)
    assert info.value.outcome == "auth_error"
    assert "wrong" not in str(info.value)


async def test_cancel_all_hang_times_out(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A hung exchange is a client timeout, retryable."""
    ems_sim.sim.set_fault(ACCOUNT, hang=True)
    with pytest.raises(EmsUnavailableError) as info:
        await client.cancel_all(ACCOUNT, limit_seconds=0.2)
    assert info.value.outcome == "timeout"


async def test_cancel_all_dropped_connection_is_network_error(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A connection closed without an answer is a network error, retryable."""
    ems_sim.sim.set_fault(ACCOUNT, drop=True)
    with pytest.raises(EmsUnavailableError) as info:
        await client.cancel_all(ACCOUNT)
    assert info.value.outcome == "network_error"


async def test_cancel_all_garbage_200_is_accepted_as_a_hint(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A 200 whose body is not JSON is accepted: verification is the truth."""
    ems_sim.sim.set_fault(ACCOUNT, garbage_body=True)
    ack = await client.cancel_all(ACCOUNT)
    assert ack.status == 200


async def test_cancel_all_huge_body_is_read_bounded(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """A huge success body does not break classification."""
    ems_sim.sim.set_fault(ACCOUNT, huge_body_bytes=2_000_000)
    ack = await client.cancel_all(ACCOUNT)
    assert ack.status == 200


async def test_open_orders_lists_only_open_orders(
    ems_sim: RunningSim, client: EmsClient
) -> None:
    """GET /v1/orders?exchange_id= returns the account's open orders."""
    orders = await client.open_orders(ACCOUNT)
    assert len(orders) == 3
    assert {o["exchange_id"] for o in orders} == {ACCOUNT}
    assert ems_sim.sim.requests[-1].path == "/v1/orders"


async def test_self_hosted_ems_sends_no_key_header(
    ems_sim: RunningSim, session: aiohttp.ClientSession
) -> None:
    """Without a configured key no X-CoinAPI-Key header is sent at all."""
    ems_sim.sim.api_key = None
    ems = {"default": EmsConfig(name="default", base_url=ems_sim.base_url)}
    client = EmsClient(session, ems, (AccountConfig(exchange_id=ACCOUNT),))
    await client.cancel_all(ACCOUNT)
    assert "X-CoinAPI-Key" not in ems_sim.sim.requests[-1].headers


def test_classify_parses_json_whatever_the_content_type() -> None:
    """The spec's `appliction/json` typo does not matter: the body is parsed."""
    body = json.dumps(
        {"type": "MESSAGE_REJECT", "reject_reason": "EXCHANGE_UNREACHABLE"}
    ).encode()
    with pytest.raises(EmsUnavailableError):
        classify("X", "cancel_all", 200, {"Content-Type": "appliction/json"}, body)


def test_classify_200_with_empty_reject_reason_is_accepted() -> None:
    """type MESSAGE_REJECT with an empty reject_reason is not a rejection."""
    body = json.dumps({"type": "MESSAGE_REJECT", "reject_reason": ""}).encode()
    assert classify("X", "cancel_all", 200, {}, body) == {
        "type": "MESSAGE_REJECT",
        "reject_reason": "",
    }


BASE = "http://ems.invalid"
URL = f"{BASE}/v1/orders/cancel/all"


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectorError(
            aiohttp.client_reqrep.ConnectionKey(
                "ems.invalid", 80, False, True, None, None, None
            ),
            ConnectionRefusedError(111, "Connection refused"),
        ),
        aiohttp.ClientConnectorDNSError(
            aiohttp.client_reqrep.ConnectionKey(
                "ems.invalid", 80, False, True, None, None, None
            ),
            OSError(-2, "Name or service not known"),
        ),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
    ids=["refused", "dns", "disconnected", "reset", "payload"],
)
async def test_cancel_all_transport_faults_are_network_errors(exc: Exception) -> None:
    """Transport failures at the client boundary become retryable network errors."""
    async with aiohttp.ClientSession() as session:
        client = EmsClient(
            session,
            {"default": EmsConfig(name="default", base_url=BASE)},
            (AccountConfig(exchange_id=ACCOUNT),),
        )
        with aioresponses() as mocked:
            mocked.post(URL, exception=exc)
            with pytest.raises(EmsUnavailableError) as info:
                await client.cancel_all(ACCOUNT)
    assert info.value.outcome == "network_error"
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
