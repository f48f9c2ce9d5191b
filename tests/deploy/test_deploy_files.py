"""The systemd unit and deploy/ files, checked by the tools that consume them.

Tools: promtool (Debian package `prometheus`), amtool (`prometheus-alertmanager`),
systemd-analyze, systemd-sysusers and systemd-tmpfiles (`systemd`). A missing tool
skips its tests with the reason, except under CI=true, where it fails them.

`referenced_metric_names()` returns every killswitch_* sample name that the alert
rules and the Grafana dashboard query, so a test of the running daemon can check
them against a live /metrics page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "killswitch.rules.yml"
RULES_TESTS = PROMETHEUS_DIR / "killswitch.rules.test.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "killswitch-dashboard.json"
UNIT = ROOT / "systemd" / "killswitch.service"
SYSUSERS = ROOT / "systemd" / "killswitch.sysusers.conf"
TMPFILES = ROOT / "systemd" / "killswitch.tmpfiles.conf"
EXAMPLE_CONFIG = ROOT / "config" / "killswitch.example.yaml"

TOOL_TIMEOUT_SECONDS = 60.0
MAX_EXPOSURE = 2.0
INSTALLED_BINARY = "/opt/killswitch/venv/bin/killswitch"

# SPEC.md "Metrics": the contract. Name -> type.
SPEC_METRICS: Mapping[str, str] = {
    "killswitch_tripped": "gauge",
    "killswitch_trips_total": "counter",
    "killswitch_cancel_requests_total": "counter",
    "killswitch_cancel_retries_total": "counter",
    "killswitch_cancel_request_duration_seconds": "histogram",
    "killswitch_sweep_duration_seconds": "histogram",
    "killswitch_trigger_to_wire_seconds": "histogram",
    "killswitch_open_orders": "gauge",
    "killswitch_account_flat": "gauge",
    "killswitch_pnl": "gauge",
    "killswitch_pnl_age_seconds": "gauge",
    "killswitch_pnl_headroom": "gauge",
    "killswitch_pnl_read_errors_total": "counter",
    "killswitch_http_requests_total": "counter",
    "killswitch_ems_up": "gauge",
    "killswitch_last_trip_timestamp_seconds": "gauge",
    "killswitch_build_info": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Where each tool comes from, for the skip/fail message.
TOOL_PACKAGES: Mapping[str, str] = {
    "promtool": "prometheus",
    "amtool": "prometheus-alertmanager",
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "systemd-tmpfiles": "systemd",
}

_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC_NAME = re.compile(r"(?<![\w:])killswitch_[A-Za-z0-9_]+")


# --------------------------------------------------------------------------- helpers


def allowed_sample_names() -> frozenset[str]:
    """Every sample name SPEC's metrics may expose (histograms as their series)."""
    names: set[str] = set()
    for name, kind in SPEC_METRICS.items():
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return frozenset(names)


def metric_names_in(promql: str) -> set[str]:
    """The killswitch_* metric names one PromQL expression selects.

    String literals are removed first, so a label value never counts as a name.
    """
    return set(_METRIC_NAME.findall(_STRING_LITERAL.sub('""', promql)))


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alert_rules() -> list[dict[str, Any]]:
    groups = _load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panels and annotations."""
    dashboard = _dashboard()
    exprs = [
        target["expr"]
        for panel in _dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def referenced_metric_names() -> set[str]:
    """Every killswitch_* sample name that the alert rules and dashboard use.

    Names are as /metrics spells them (`..._total`, `..._bucket`), so a test of the
    running daemon can assert they all appear in its exposition.
    """
    names: set[str] = set()
    for rule in _alert_rules():
        names |= metric_names_in(rule["expr"])
        for text in rule.get("annotations", {}).values():
            names |= set(_METRIC_NAME.findall(text))
    for expr in dashboard_exprs():
        names |= metric_names_in(expr)
    return names


def _tool(name: str) -> str:
    """The tool's path; skip (locally) or fail (CI=true) when it is missing."""
    path = shutil.which(name)
    if path is None:
        reason = (
            f"{name} is not installed "
            f"(Debian: apt-get install {TOOL_PACKAGES.get(name, name)})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it")
        pytest.skip(reason)
    return path


def _run(argv: list[str], cwd: Path | None = None, stdin: str | None = None) -> str:
    """Run a tool, assert exit status 0, return stdout and stderr together."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{output}"
    return output


def _unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file: section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return _unit_settings(UNIT)["Service"]


# ------------------------------------------------------------------ Prometheus rules


def test_rules_pass_promtool_check():
    """promtool accepts the alert rules file."""
    _run([_tool("promtool"), "check", "rules", str(RULES)])


def test_rules_unit_tests_pass():
    """The promtool unit tests of the alert rules pass."""
    _run([_tool("promtool"), "test", "rules", RULES_TESTS.name], cwd=PROMETHEUS_DIR)


def test_rules_unit_tests_cover_every_alert_firing_and_quiet():
    """Every alert has a unit test where it fires and one where it stays quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load_yaml(RULES_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_rules_about_the_killswitch_can_never_trip_it():
    """No alert carries severity=critical or the killswitch label: no trip loop."""
    for rule in _alert_rules():
        labels = rule.get("labels", {})
        assert rule["alert"].startswith("Killswitch"), rule["alert"]
        assert labels.get("severity") in {"page", "warning"}, rule["alert"]
        assert "killswitch" not in labels, rule["alert"]
        assert "killswitch_accounts" not in labels, rule["alert"]
        assert {"summary", "description"} <= set(rule.get("annotations", {}))


# ------------------------------------------------------------------ Prometheus config


def test_prometheus_config_passes_promtool_check():
    """promtool accepts prometheus.yml and the rule file it loads."""
    output = _run([_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert "1 rule files found" in output


def test_prometheus_config_scrapes_both_instances_and_alerts():
    """The killswitch job scrapes two instances and alerts go to Alertmanager."""
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["killswitch"]["static_configs"] for t in sc["targets"]]
    assert "127.0.0.1:9470" in targets
    assert len(targets) == 2
    assert config["rule_files"] == [RULES.name]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


# --------------------------------------------------------------------- Alertmanager


def test_alertmanager_config_passes_amtool_check():
    """amtool accepts alertmanager.yml (the token file need not exist)."""
    _run([_tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])


def _routing_cases() -> list[tuple[dict[str, str], str]]:
    cases = [
        ({"alertname": "DeskLoss", "severity": "critical", "killswitch": "trip"},
         "killswitch,oncall"),
        ({"alertname": "DeskLoss", "killswitch": "trip",
          "killswitch_accounts": "BINANCE"}, "killswitch,oncall"),
        ({"alertname": "DiskFull", "severity": "critical"}, "oncall"),
        # A mislabelled alert about the killswitch still never reaches it.
        ({"alertname": "KillswitchDown", "severity": "critical",
          "killswitch": "trip"}, "oncall"),
    ]  # fmt: skip
    cases += [
        ({"alertname": rule["alert"], **rule.get("labels", {})}, "oncall")
        for rule in _alert_rules()
    ]
    return cases


@pytest.mark.parametrize(
    ("labels", "receivers"),
    _routing_cases(),
    ids=lambda value: value.get("alertname") if isinstance(value, dict) else value,
)
def test_alertmanager_routes(labels: dict[str, str], receivers: str):
    """Risk alerts reach the killswitch and people; the rest reach only people."""
    _run([
        _tool("amtool"), "config", "routes", "test",
        f"--config.file={ALERTMANAGER_CONFIG}", f"--verify.receivers={receivers}",
        *(f"{key}={value}" for key, value in labels.items()),
    ])  # fmt: skip


def test_alertmanager_killswitch_receiver_posts_to_the_webhook_with_a_token():
    """Each killswitch webhook posts at once to /v1/alertmanager with a bearer file."""
    config = _load_yaml(ALERTMANAGER_CONFIG)
    receivers = {r["name"]: r for r in config["receivers"]}
    hooks = receivers["killswitch"]["webhook_configs"]
    assert len(hooks) == 2, "one webhook per instance"
    for hook in hooks:
        assert hook["url"].endswith(":9470/v1/alertmanager")
        authorization = hook["http_config"]["authorization"]
        assert authorization["type"] == "Bearer"
        assert authorization["credentials_file"].startswith("/")
        assert hook["send_resolved"] is True
    routes = [r for r in config["route"]["routes"] if r["receiver"] == "killswitch"]
    assert [r["group_wait"] for r in routes] == ["0s"]


# ---------------------------------------------------------------------------- systemd


def _verifiable_unit_copy(directory: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists on this machine.

    `systemd-analyze verify` fails when ExecStart's binary is missing, and the
    install path /opt/killswitch/venv does not exist on a build machine; only that
    path changes, every other line is verified as shipped.
    """
    script = Path(sys.executable).with_name("killswitch")
    runner = str(script) if script.exists() else f"{sys.executable} -m killswitch"
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = directory / UNIT.name
    copy.write_text(
        text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={runner} ")
    )
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    """systemd-analyze verify has nothing to say about the unit."""
    unit = _verifiable_unit_copy(tmp_path)
    output = _run([_tool("systemd-analyze"), "verify", str(unit)])
    # verify exits 0 on unknown keys and bad values; their warnings name the file.
    complaints = [line for line in output.splitlines() if UNIT.name in line]
    assert complaints == []


def test_unit_exposure_is_at_most_two():
    """systemd-analyze security rates the sandbox at 2.0 or lower ("OK")."""
    output = _run(
        [
            _tool("systemd-analyze"),
            "security",
            "--offline=true",
            "--no-pager",
            str(UNIT),
        ]
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_unit_has_the_settings_spec_requires():
    """Type=notify, restart policy, directories, and the sandbox are all set."""
    service = _service()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "always",
        "RestartPreventExitStatus": "78",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "User": "killswitch",
        "StateDirectory": "killswitch",
        "ConfigurationDirectory": "killswitch",
        "RuntimeDirectory": "killswitch",
        "RuntimeDirectoryPreserve": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "UMask": "0077",
    }
    actual = {key: service.get(key, ["<unset>"])[-1] for key in expected}
    assert actual == expected
    [exec_start] = service["ExecStart"]
    assert exec_start.startswith(f"{INSTALLED_BINARY} run -c ")
    assert exec_start.endswith("/killswitch.yaml")
    assert float(service["WatchdogSec"][0]) > 0


def _example_config() -> dict[str, Any]:
    if not EXAMPLE_CONFIG.exists():
        pytest.skip(f"{EXAMPLE_CONFIG.relative_to(ROOT)} does not exist yet")
    config: dict[str, Any] = _load_yaml(EXAMPLE_CONFIG)
    return config


def test_unit_stop_timeout_outlasts_the_sweep_deadline():
    """TimeoutStopSec >= sweep.deadline_seconds + 5, so SIGTERM never cuts a sweep."""
    deadline = 15.0
    if EXAMPLE_CONFIG.exists():
        deadline = float(
            (_example_config().get("sweep") or {}).get("deadline_seconds", deadline)
        )
    assert float(_service()["TimeoutStopSec"][0]) >= deadline + 5


def test_example_config_writes_only_where_the_sandbox_allows():
    """state_dir and halt_file of the example config are the unit's own dirs."""
    config = _example_config()
    service = _service()
    state_dir = "/var/lib/" + service["StateDirectory"][0]
    runtime_dir = "/run/" + service["RuntimeDirectory"][0]
    assert config.get("state_dir", state_dir) == state_dir
    if config.get("halt_file") is not None:
        assert str(Path(config["halt_file"]).parent) == runtime_dir


def test_sysusers_creates_the_unit_user(tmp_path: Path):
    """systemd-sysusers creates the system user the unit runs as."""
    (tmp_path / "etc").mkdir()
    _run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        stdin=SYSUSERS.read_text(encoding="utf-8"),
    )
    users = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8")
    user = _service()["User"][0]
    assert re.search(rf"^{user}:x:\d+:\d+:.*:/usr/sbin/nologin$", users, re.MULTILINE)


def test_tmpfiles_creates_the_credentials_directory(tmp_path: Path):
    """systemd-tmpfiles creates /etc/killswitch/credentials, root-only."""
    tool = _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root must chown to root: run as root")
    _run(
        [tool, f"--root={tmp_path}", "--create", "-"],
        stdin=TMPFILES.read_text(encoding="utf-8"),
    )
    credentials = tmp_path / "etc" / "killswitch" / "credentials"
    stat = credentials.stat()
    assert (stat.st_mode & 0o777, stat.st_uid) == (0o700, 0)
    [load_credential] = _service()["LoadCredential"]
    assert load_credential.endswith(":/etc/killswitch/credentials")


# ---------------------------------------------------------------------------- Grafana


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    """The dashboard parses, and every panel queries the ${DS_PROMETHEUS} variable."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(_dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_shows_what_an_operator_needs():
    """The dashboard covers trip state, flatness, latency, cancels, PnL and the EMS."""
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= metric_names_in(expr)
    required = {
        "killswitch_tripped",
        "killswitch_account_flat",
        "killswitch_open_orders",
        "killswitch_sweep_duration_seconds_bucket",
        "killswitch_trigger_to_wire_seconds_bucket",
        "killswitch_cancel_requests_total",
        "killswitch_cancel_retries_total",
        "killswitch_pnl",
        "killswitch_pnl_headroom",
        "killswitch_ems_up",
        "killswitch_last_trip_timestamp_seconds",
        "killswitch_trips_total",
    }
    assert required - used == set()


def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """promtool parses every dashboard query (Grafana variables filled in)."""
    variables = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}
    rules = []
    for number, query in enumerate(dashboard_exprs()):
        expr = query
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([_tool("promtool"), "check", "rules", str(path)])


# ---------------------------------------------------------------------------- metrics


def test_deploy_files_reference_only_spec_metrics():
    """Every killswitch_* name in the rules and the dashboard is one of SPEC's."""
    names = referenced_metric_names()
    assert names, "the extraction found nothing: is the regex broken?"
    assert names - allowed_sample_names() == set()


@pytest.mark.parametrize(
    ("promql", "names"),
    [
        ('max by (account) (killswitch_tripped{job="killswitch"}) == 1',
         {"killswitch_tripped"}),
        ("histogram_quantile(0.99, sum by (le) "
         "(rate(killswitch_sweep_duration_seconds_bucket[1m])))",
         {"killswitch_sweep_duration_seconds_bucket"}),
        ('up{job="killswitch", instance="killswitch_x"}', set()),
        ("killswitch_a / killswitch_b_total", {"killswitch_a", "killswitch_b_total"}),
    ],
)  # fmt: skip
def test_metric_names_in_finds_names_not_label_values(promql: str, names: set[str]):
    """The extraction sees metric names and ignores label values."""
    assert metric_names_in(promql) == names
