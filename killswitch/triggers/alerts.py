"""Alertmanager (webhook v4) and Grafana (version 1) payloads -> TripRequest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from killswitch.errors import TriggerError
from killswitch.triggers import TripRequest

ACCOUNTS_LABEL = "killswitch_accounts"
AlertSource = Literal["alertmanager", "grafana"]
# A reason ends up in the log, the audit record and /v1/status: keep it short.
MAX_REASON_CHARS = 500


def parse_payload(body: bytes, kind: AlertSource) -> dict[str, Any]:
    """Decode a webhook body into its top-level object.

    Raises:
        TriggerError: the body is not a JSON object with an `alerts` list.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"{kind} payload is not JSON: {exc}"
        raise TriggerError(msg) from exc
    except RecursionError as exc:  # json's C scanner recurses once per nesting level
        msg = f"{kind} payload is nested too deeply"
        raise TriggerError(msg) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
        msg = f"{kind} payload has no 'alerts' list"
        raise TriggerError(msg)
    return doc


def _matches(labels: Mapping[str, Any], match: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def firing_trip(
    doc: Mapping[str, Any],
    match: Mapping[str, str],
    source: AlertSource,
    actor: str | None,
) -> TripRequest | None:
    """A TripRequest when any firing alert matches, else None (resolved never resets).

    A matching alert may scope the trip with `killswitch_accounts="A,B"`; one
    matching alert without that label widens the trip to every account.
    """
    names: list[str] = []
    scoped: list[str] = []
    unscoped = False
    notes: list[str] = []
    for index, alert in enumerate(doc["alerts"]):
        if not isinstance(alert, dict):
            notes.append(f"alerts[{index}] is not an object; ignored")
            continue
        labels = alert.get("labels")
        if not isinstance(labels, dict):
            labels = {}
        if alert.get("status") != "firing" or not _matches(labels, match):
            continue
        names.append(str(labels.get("alertname", f"alerts[{index}]")))
        scope = labels.get(ACCOUNTS_LABEL)
        if isinstance(scope, str) and scope.strip():
            scoped.extend(a.strip() for a in scope.split(",") if a.strip())
        else:
            unscoped = True
    if not names:
        return None
    reason = f"{source} alert firing: {', '.join(sorted(set(names)))}"
    return TripRequest(
        source=source,
        reason=reason[:MAX_REASON_CHARS],
        accounts=None if unscoped else tuple(dict.fromkeys(scoped)),
        actor=actor,
        notes=tuple(notes[:10]),
    )
