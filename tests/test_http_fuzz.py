"""Property-based: arbitrary bodies on the trip endpoints never break the API.

One in-process API (the real app, Switch and Fanout on the EMS simulator) serves
every example of a test, so "the server keeps answering" is checked across them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ACCOUNTS, RunningSim
from tests.test_http import ONCALL_TOKEN, TRIP_TOKEN, Api, api_config, serving_api

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # One server for all examples is the point: it must survive all of them.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
account_names = st.sampled_from([*ACCOUNTS, "NOPE", "binance", ""]) | st.text(
    max_size=12
)
trip_docs = st.fixed_dictionaries(
    {},
    optional={
        "reason": st.text(max_size=30) | json_values,
        "accounts": st.lists(account_names, max_size=6) | json_values,
    },
)
alert_labels = st.dictionaries(
    st.sampled_from(["alertname", "severity", "killswitch_accounts", "team"])
    | st.text(max_size=8),
    st.sampled_from(["critical", "warning", "COINBASE", "BINANCE,NOPE", " , "])
    | st.text(max_size=12)
    | json_values,
    max_size=4,
)
alerts = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["firing", "resolved", "FIRING"]) | json_values,
        "labels": alert_labels | json_values,
        "annotations": json_values,
    },
)
alert_docs = st.fixed_dictionaries(
    {"alerts": st.lists(alerts | json_values, max_size=5) | json_values},
    optional={"version": st.sampled_from(["4", "1"]), "status": st.text(max_size=9)},
)


def encoded(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda doc: json.dumps(doc).encode())


# JSON nested deeper than the parser recurses (1000 levels); short enough that
# hypothesis can still print a failing example.
deep_bodies = st.builds(
    lambda n, opener: opener * n,
    st.integers(min_value=1, max_value=2_500),
    st.sampled_from([b"[", b'{"a":', b'{"alerts":[']),
)
trip_bodies = (
    st.binary(max_size=2048) | encoded(trip_docs) | encoded(json_values) | deep_bodies
)
alert_bodies = (
    st.binary(max_size=2048) | encoded(alert_docs) | encoded(json_values) | deep_bodies
)


def scoped_accounts(body: bytes) -> tuple[str, ...] | None:
    """The accounts a /v1/trip body validly names; None when it trips all."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    accounts = doc.get("accounts")
    if (
        not isinstance(accounts, list)
        or not accounts
        or not all(isinstance(a, str) and a in ACCOUNTS for a in accounts)
    ):
        return None
    return tuple(dict.fromkeys(accounts))


@pytest.fixture
async def api(ems_sim: RunningSim, tmp_path: Path) -> AsyncIterator[Api]:
    """One API for every example of the test (alert matchers: severity=critical)."""
    async with serving_api(ems_sim, api_config(ems_sim.base_url, tmp_path)) as served:
        yield served
        await served.wait_idle()


async def assert_still_serving(api: Api) -> None:
    code, _ = await api.call("GET", "/healthz")
    assert code == 200


@FUZZ
@given(body=trip_bodies)
async def test_trip_any_body_always_trips(api: Api, body: bytes) -> None:
    """Any body with a trip token is a 202 trip: the named accounts, or all of them."""
    before = api.sample("killswitch_trips_total", {"source": "webhook"})
    code, reply = await api.call("POST", "/v1/trip", token=TRIP_TOKEN, data=body)
    assert code == 202, reply
    scoped = scoped_accounts(body)
    assert tuple(reply["accounts"]) == (ACCOUNTS if scoped is None else scoped)
    assert reply["state"] == "tripped"
    assert api.sample("killswitch_trips_total", {"source": "webhook"}) == before + 1
    await assert_still_serving(api)


@FUZZ
@given(body=alert_bodies)
async def test_alertmanager_any_body_never_fails(api: Api, body: bytes) -> None:
    """Any body on /v1/alertmanager is answered 200; an unreadable one trips all."""
    code, reply = await api.call(
        "POST", "/v1/alertmanager", token=TRIP_TOKEN, data=body
    )
    assert code == 200, reply
    assert isinstance(reply["tripped"], bool)
    if reply["tripped"]:
        assert set(reply["accounts"]) <= set(ACCOUNTS)
        assert reply["accounts"]
    await assert_still_serving(api)


@FUZZ
@given(body=alert_bodies)
async def test_grafana_any_body_never_fails(api: Api, body: bytes) -> None:
    """Any body on /v1/grafana is answered 200 with a trip decision, never a 5xx."""
    code, reply = await api.call("POST", "/v1/grafana", token=TRIP_TOKEN, data=body)
    assert code == 200, reply
    assert isinstance(reply["tripped"], bool)
    await assert_still_serving(api)


@FUZZ
@given(body=trip_bodies)
async def test_reset_any_body_is_200_or_400(api: Api, body: bytes) -> None:
    """Any body on /v1/reset is a 200 reset or a 400 JSON error, never a 5xx."""
    code, reply = await api.call("POST", "/v1/reset", token=ONCALL_TOKEN, data=body)
    assert code in (200, 400), reply
    if code == 400:
        assert set(reply) == {"error", "detail"}
    await assert_still_serving(api)
