"""POST /v1/grafana: the Grafana alerting webhook (version "1"), HMAC or bearer."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from killswitch.config import GrafanaConfig, TriggersConfig
from tests.conftest import ACCOUNTS, RunningSim
from tests.test_http import (
    STATUS_TOKEN,
    TRIP_TOKEN,
    Api,
    api_config,
    raw_request,
    serving_api,
)

SECRET = "grafana-hmac-secret-7f3e"
SIGNATURE = "X-Grafana-Alerting-Signature"
TIMESTAMP = "X-Grafana-Alerting-Timestamp"


def grafana_payload(status: str = "firing", **labels: str) -> dict[str, Any]:
    """A Grafana alerting webhook body, version "1", as Grafana 11/12 sends it."""
    labels = {"alertname": "DeskLoss", "grafana_folder": "Risk",
              "severity": "critical", **labels}  # fmt: skip
    firing = status == "firing"
    alert = {
        "status": status,
        "labels": labels,
        "annotations": {"summary": "desk PnL below the loss limit"},
        "startsAt": "2026-03-02T10:15:00Z",
        "endsAt": "0001-01-01T00:00:00Z" if firing else "2026-03-02T10:20:00Z",
        "generatorURL": "http://grafana:3000/alerting/grafana/de2ad39/view?orgId=1",
        "fingerprint": "57c6d9296de2ad39",
        "silenceURL": "http://grafana:3000/alerting/silence/new?alertmanager=grafana",
        "dashboardURL": "http://grafana:3000/d/risk?orgId=1",
        "panelURL": "http://grafana:3000/d/risk?orgId=1&viewPanel=2",
        "values": {"A": -61250.5, "C": 1},
        "valueString": "[ var='A' labels={} value=-61250.5 ], [ var='C' value=1 ]",
    }
    return {
        "receiver": "killswitch",
        "status": status,
        "orgId": 1,
        "alerts": [alert],
        "groupLabels": {"alertname": "DeskLoss", "grafana_folder": "Risk"},
        "commonLabels": labels,
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://grafana:3000/",
        "version": "1",
        "groupKey": '{}/{severity="critical"}:{alertname="DeskLoss"}',
        "truncatedAlerts": 0,
        "title": f"[{status.upper()}:1] DeskLoss Risk (critical)",
        "state": "alerting" if firing else "ok",
        "message": "**Firing**\n\nValue: A=-61250.5\nLabels:\n - alertname = DeskLoss",
    }


def sign(body: bytes, stamp: str | None = None, secret: str = SECRET) -> str:
    """Grafana's signature: hex HMAC-SHA256 of the body, or of "<timestamp>:<body>"."""
    signed = body if stamp is None else stamp.encode() + b":" + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, stamp: str | None = None) -> dict[str, str]:
    headers = {SIGNATURE: sign(body, stamp), "Content-Type": "application/json"}
    if stamp is not None:
        headers[TIMESTAMP] = stamp
    return headers


def now_stamp(offset_seconds: float = 0.0) -> str:
    """Unix seconds, as Grafana sends them; call it when sending, not at import."""
    return str(round(time.time() + offset_seconds))


async def serve(
    ems_sim: RunningSim, tmp_path: Path, grafana: GrafanaConfig
) -> AsyncIterator[Api]:
    cfg = api_config(
        ems_sim.base_url,
        tmp_path,
        triggers=TriggersConfig(signal=False, grafana=grafana),
    )
    async with serving_api(ems_sim, cfg) as api:
        yield api


@pytest.fixture
async def signed_api(ems_sim: RunningSim, tmp_path: Path) -> AsyncIterator[Api]:
    """Grafana with an HMAC secret, body-only signatures (no timestamp header)."""
    grafana = GrafanaConfig(match={"severity": "critical"}, hmac_secret=SECRET)
    async for api in serve(ems_sim, tmp_path, grafana):
        yield api


@pytest.fixture
async def stamped_api(ems_sim: RunningSim, tmp_path: Path) -> AsyncIterator[Api]:
    """Grafana with an HMAC secret and a signed timestamp header."""
    grafana = GrafanaConfig(
        match={"severity": "critical"}, hmac_secret=SECRET, timestamp_header=TIMESTAMP
    )
    async for api in serve(ems_sim, tmp_path, grafana):
        yield api


@pytest.fixture
async def bearer_api(ems_sim: RunningSim, tmp_path: Path) -> AsyncIterator[Api]:
    """Grafana without an HMAC secret: a bearer token with `trip` is the only way."""
    async for api in serve(ems_sim, tmp_path, GrafanaConfig(match={})):
        yield api


BODY = json.dumps(grafana_payload()).encode()


async def test_grafana_signed_body_trips_every_account(signed_api: Api) -> None:
    """A firing critical alert with a correct body signature trips all accounts."""
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=BODY, headers=signed_headers(BODY)
    )
    assert code == 200
    assert body["tripped"] is True
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    await signed_api.wait_cancelled()
    last = signed_api.switch.latch.last_trip
    assert last is not None
    assert (last.source, last.reason) == ("grafana", "grafana alert firing: DeskLoss")


async def test_grafana_signed_timestamp_and_body_trips(stamped_api: Api) -> None:
    """With timestamp_header, the signature covers "<timestamp>:<body>"."""
    stamp = now_stamp()
    code, body = await stamped_api.call(
        "POST", "/v1/grafana", data=BODY, headers=signed_headers(BODY, stamp)
    )
    assert (code, body["tripped"]) == (200, True)
    assert stamped_api.switch.latch.tripped_accounts == ACCOUNTS


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {SIGNATURE: ""},
        {SIGNATURE: sign(BODY, secret="not-the-secret")},
        {SIGNATURE: sign(BODY + b" ")},
        {SIGNATURE: "sha256=" + sign(BODY)},
        {SIGNATURE: sign(BODY)[:-1]},
        {SIGNATURE: "zz" * 32},
    ],
    ids=["missing", "empty", "wrong-secret", "other-body", "prefixed", "short", "hex"],
)
async def test_grafana_bad_signature_is_401_and_trips_nothing(
    signed_api: Api, headers: dict[str, str]
) -> None:
    """A missing or wrong signature is 401 JSON, and nothing is tripped."""
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=BODY, headers=headers
    )
    assert (code, body["error"]) == (401, "unauthorized")
    assert not signed_api.switch.latch.is_any_tripped
    assert signed_api.cancels() == []


async def test_grafana_uppercase_hex_signature_is_accepted(signed_api: Api) -> None:
    """Hex is case-insensitive: an uppercase digest is the same signature."""
    code, _ = await signed_api.call(
        "POST", "/v1/grafana", data=BODY, headers={SIGNATURE: sign(BODY).upper()}
    )
    assert code == 200
    assert signed_api.switch.latch.tripped_accounts == ACCOUNTS


async def test_grafana_non_utf8_signature_is_401_not_500(signed_api: Api) -> None:
    """A signature header with bytes that are not UTF-8 is a bad signature."""
    status = await raw_request(
        signed_api,
        b"POST /v1/grafana HTTP/1.1\r\nHost: x\r\n"
        + SIGNATURE.encode() + b": \xff\xfe" + sign(BODY).encode()[2:],
        BODY,
    )  # fmt: skip
    assert status.startswith(b"HTTP/1.1 401"), status
    assert not signed_api.switch.latch.is_any_tripped


@pytest.mark.parametrize(
    "stamp",
    [-301.0, -3600.0, +301.0, "nan", "inf", "-inf", "", "yesterday", "2026-03-02"],
    ids=["old", "hour-old", "future", "nan", "inf", "-inf", "empty", "word", "iso"],
)
async def test_grafana_timestamp_outside_skew_or_unparsable_is_401(
    stamped_api: Api, stamp: float | str
) -> None:
    """A correctly signed timestamp that is stale, future or unparsable is 401."""
    sent = now_stamp(stamp) if isinstance(stamp, float) else stamp
    code, body = await stamped_api.call(
        "POST", "/v1/grafana", data=BODY, headers=signed_headers(BODY, sent)
    )
    assert (code, body["error"]) == (401, "unauthorized")
    assert not stamped_api.switch.latch.is_any_tripped


async def test_grafana_missing_timestamp_header_is_401(stamped_api: Api) -> None:
    """When timestamps are configured, a body-only signature without one is 401."""
    code, _ = await stamped_api.call(
        "POST", "/v1/grafana", data=BODY, headers={SIGNATURE: sign(BODY)}
    )
    assert code == 401
    assert not stamped_api.switch.latch.is_any_tripped


async def test_grafana_signature_without_the_timestamp_is_401(stamped_api: Api) -> None:
    """A fresh timestamp with a signature over the body alone does not verify."""
    headers = {SIGNATURE: sign(BODY), TIMESTAMP: now_stamp()}
    code, _ = await stamped_api.call("POST", "/v1/grafana", data=BODY, headers=headers)
    assert code == 401


async def test_grafana_replayed_signed_request_is_401(stamped_api: Api) -> None:
    """The same signed request sent twice: the first trips, the replay is 401."""
    headers = signed_headers(BODY, now_stamp())
    first, _ = await stamped_api.call("POST", "/v1/grafana", data=BODY, headers=headers)
    replay, body = await stamped_api.call(
        "POST", "/v1/grafana", data=BODY, headers=headers
    )
    assert (first, replay) == (200, 401)
    assert "replay" in body["detail"]
    assert stamped_api.sample("killswitch_trips_total", {"source": "grafana"}) == 1


async def test_grafana_new_timestamp_is_not_a_replay(stamped_api: Api) -> None:
    """Grafana re-sending the same alert later signs a new timestamp: accepted."""
    for offset in (-5, 0):
        code, _ = await stamped_api.call(
            "POST", "/v1/grafana", data=BODY,
            headers=signed_headers(BODY, now_stamp(offset)),
        )  # fmt: skip
        assert code == 200
    assert stamped_api.sample("killswitch_trips_total", {"source": "grafana"}) == 2


async def test_grafana_bearer_token_with_trip_works_without_signature(
    signed_api: Api,
) -> None:
    """A bearer token with `trip` authenticates instead of the signature."""
    code, body = await signed_api.call(
        "POST", "/v1/grafana", token=TRIP_TOKEN, data=BODY
    )
    assert (code, body["tripped"]) == (200, True)
    assert signed_api.switch.latch.tripped_accounts == ACCOUNTS


async def test_grafana_token_without_trip_needs_a_signature(signed_api: Api) -> None:
    """A status-only token is not enough; with a valid signature the alert trips."""
    code, _ = await signed_api.call(
        "POST", "/v1/grafana", token=STATUS_TOKEN, data=BODY
    )
    assert code == 401
    assert not signed_api.switch.latch.is_any_tripped
    code, _ = await signed_api.call(
        "POST", "/v1/grafana", token=STATUS_TOKEN, data=BODY,
        headers=signed_headers(BODY),
    )  # fmt: skip
    assert code == 200


@pytest.mark.parametrize(
    ("token", "status"), [(None, 401), ("nope", 401), (STATUS_TOKEN, 403)]
)
async def test_grafana_without_hmac_needs_a_trip_token(
    bearer_api: Api, token: str | None, status: int
) -> None:
    """Without hmac_secret, a signature counts for nothing: only a trip token works."""
    code, _ = await bearer_api.call(
        "POST", "/v1/grafana", token=token, data=BODY, headers=signed_headers(BODY)
    )
    assert code == status
    assert not bearer_api.switch.latch.is_any_tripped


@pytest.mark.parametrize(
    ("payload", "tripped"),
    [
        (grafana_payload(), True),
        (grafana_payload(severity="warning"), False),
        (grafana_payload(status="resolved"), False),
        (grafana_payload(severity="critical", team="desk"), True),
    ],
    ids=["critical", "warning", "resolved", "extra-label"],
)
async def test_grafana_trips_only_on_matching_firing_alerts(
    signed_api: Api, payload: dict[str, Any], tripped: bool
) -> None:
    """Only firing alerts whose labels include triggers.grafana.match trip."""
    data = json.dumps(payload).encode()
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=data, headers=signed_headers(data)
    )
    assert code == 200
    assert body["tripped"] is tripped
    assert signed_api.switch.latch.is_any_tripped is tripped


async def test_grafana_empty_match_trips_on_any_firing_alert(bearer_api: Api) -> None:
    """`match: {}` matches every firing alert, whatever its labels."""
    data = json.dumps(grafana_payload(severity="info")).encode()
    code, body = await bearer_api.call(
        "POST", "/v1/grafana", token=TRIP_TOKEN, data=data
    )
    assert (code, body["tripped"]) == (200, True)


async def test_grafana_accounts_label_scopes_the_trip(signed_api: Api) -> None:
    """killswitch_accounts="A,B" on the alert trips only those accounts."""
    data = json.dumps(
        grafana_payload(killswitch_accounts="KRAKEN/JOHN, BITSTAMP/2574")
    ).encode()
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=data, headers=signed_headers(data)
    )
    assert code == 200
    assert body["accounts"] == ["KRAKEN/JOHN", "BITSTAMP/2574"]
    await signed_api.wait_cancelled(("KRAKEN/JOHN", "BITSTAMP/2574"))
    await signed_api.wait_idle()
    assert sorted(signed_api.cancels()) == ["BITSTAMP/2574", "KRAKEN/JOHN"]


async def test_grafana_signed_unreadable_payload_trips_everything(
    signed_api: Api,
) -> None:
    """A correctly signed body we cannot read fails safe: every account trips."""
    data = b'{"version": "1", "alerts": "not a list"}'
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=data, headers=signed_headers(data)
    )
    assert (code, body["tripped"]) == (200, True)
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    assert any("no 'alerts' list" in n for n in body["notes"])


async def test_grafana_unsigned_oversize_body_is_413_and_trips_nothing(
    signed_api: Api,
) -> None:
    """An oversize body cannot be verified: 413, and nothing trips."""
    data = b" " * (signed_api.cfg.api.max_body_bytes + 1)
    code, body = await signed_api.call(
        "POST", "/v1/grafana", data=data, headers=signed_headers(data)
    )
    assert (code, body["error"]) == (413, "payload_too_large")
    assert not signed_api.switch.latch.is_any_tripped
