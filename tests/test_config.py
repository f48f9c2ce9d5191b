"""Tests for killswitch.config: load_config() validation, secrets and redacted()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from killswitch.config import (
    REDACTED,
    AccountConfig,
    ApiConfig,
    LogConfig,
    RetryConfig,
    SweepConfig,
    load_config,
    redacted,
)
from killswitch.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

# the smallest valid config; each bad snippet below replaces some of its top-level keys
BASE: dict[str, Any] = {
    "ems": {"default": {"base_url": "http://127.0.0.1:9480"}},
    "accounts": ["BINANCE", "KRAKEN/JOHN"],
    "state_dir": "state",
}
PNL = "triggers: {pnl: [{name: desk, path: pnl.json, max_loss: 100, %s}]}"
OPS_ROW = "api: {tokens: [{name: ops, token_env: KS_TEST_TOKEN, %s}]}"

ENV_BEARER = "env-token-value"
ENV_HMAC = "hmac-value"
FILE_BEARER = "file-token-value"
# the systemd credential copies the example reads (systemd/killswitch.service)
CREDENTIALS_PREFIX = "/run/credentials/killswitch.service/secret_"
EXAMPLE_SECRETS = {
    "coinapi.key": "example-coinapi-key",
    "risk-engine.token": "example-risk-engine",
    "alertmanager.token": "example-alertmanager",
    "oncall.token": "example-oncall",
    "grafana.hmac": "example-grafana-hmac",
}


def write_config(directory: Path, text: str) -> Path:
    path = directory / "killswitch.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_with(directory: Path, snippet: str) -> Path:
    """Write BASE with the top-level keys of `snippet` replacing its own."""
    data = BASE | (yaml.safe_load(snippet) or {})
    return write_config(directory, yaml.safe_dump(data))


def problems_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def example_copy(directory: Path, *, with_secrets: bool = True) -> Path:
    """Copy the production template with its credentials moved into `directory`.

    This is the check deploy/README.md describes for a stopped unit: the same file
    with the credential copies' directory swapped for the originals'.
    """
    text = (CONFIG_DIR / "killswitch.example.yaml").read_text(encoding="utf-8")
    credentials = directory / "credentials"
    credentials.mkdir()
    if with_secrets:
        for name, value in EXAMPLE_SECRETS.items():
            (credentials / name).write_text(f"{value}\n", encoding="utf-8")
    return write_config(directory, text.replace(CREDENTIALS_PREFIX, f"{credentials}/"))


@pytest.fixture(autouse=True)
def _test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_TOKEN", ENV_BEARER)
    monkeypatch.delenv("KS_TEST_UNSET", raising=False)


@pytest.mark.parametrize(
    ("snippet", "key_path", "message"),
    [
        # unknown keys and section types
        ("bogus: 1", "bogus", "unknown key"),
        ("retry: {max_atempts: 3}", "retry.max_atempts", "unknown key"),
        ("retry: [1]", "retry", "must be a mapping"),
        (
            "triggers: {alertmanager: null}",
            "triggers.alertmanager",
            "must be a mapping",
        ),
        ("state_dir: null", "state_dir", "is required"),
        ("halt_file: ''", "halt_file", "must be non-empty"),
        # ems
        ("ems: {}", "ems", "at least one EMS endpoint"),
        ("ems: {default: {timeout_seconds: 1}}", "ems.default.base_url", "required"),
        ("ems: {default: {base_url: 'ftp://h'}}", "ems.default.base_url", "http"),
        (
            "ems: {default: {base_url: 'https://u:p@h'}}",
            "ems.default.base_url",
            "credentials",
        ),
        (
            "ems: {default: {base_url: 'http://h', api_key_env: A, api_key: b}}",
            "ems.default",
            "at most one of api_key_file, api_key_env, api_key",
        ),
        (
            "ems: {default: {base_url: 'http://h', api_key_file: missing.key}}",
            "ems.default.api_key_file",
            "No such file or directory",
        ),
        (
            "ems: {default: {base_url: 'http://h', api_key_env: KS_TEST_UNSET}}",
            "ems.default.api_key_env",
            "environment variable KS_TEST_UNSET is not set",
        ),
        (
            "ems: {default: {base_url: 'http://h', timeout_seconds: 0}}",
            "ems.default.timeout_seconds",
            "must be > 0",
        ),
        # accounts
        ("accounts: []", "accounts", "must be a non-empty list"),
        ("accounts: [BINANCE, '']", "accounts[1]", "'' must be non-empty"),
        ("accounts: ['KRAKEN JOHN']", "accounts[0]", "must not contain whitespace"),
        ("accounts: [42]", "accounts[0]", "got integer"),
        ("accounts: [OKX, OKX]", "accounts[1]", "duplicate account 'OKX'"),
        ("accounts: [{ems: default}]", "accounts[0].id", "is required"),
        ("accounts: [{id: OKX, venue: x}]", "accounts[0].venue", "unknown key"),
        ("accounts: [{id: OKX, ems: backup}]", "accounts[0].ems", "unknown ems"),
        # retry and sweep
        ("retry: {max_attempts: true}", "retry.max_attempts", "got boolean"),
        ("retry: {max_attempts: 0}", "retry.max_attempts", "must be >= 1"),
        ("retry: {max_attempts: 2.5}", "retry.max_attempts", "must be an integer"),
        ("retry: {max_attempts_other: 0}", "retry.max_attempts_other", ">= 1"),
        ("retry: {backoff_initial_seconds: 0}", "retry.backoff_initial_seconds", "> 0"),
        (
            "retry: {backoff_initial_seconds: 2, backoff_max_seconds: 1}",
            "retry.backoff_max_seconds",
            "must be >= backoff_initial_seconds",
        ),
        ("sweep: {deadline_seconds: .inf}", "sweep.deadline_seconds", "finite"),
        ("sweep: {deadline_seconds: '15'}", "sweep.deadline_seconds", "got string"),
        ("sweep: {verify: 'yes'}", "sweep.verify", "must be true or false"),
        ("sweep: {verify_attempts: 0}", "sweep.verify_attempts", "must be >= 1"),
        (
            "sweep: {resweep_interval_seconds: -1}",
            "sweep.resweep_interval_seconds",
            ">= 0",
        ),
        # api
        ("api: {listen: '127.0.0.1'}", "api.listen", "HOST:PORT"),
        ("api: {listen: '127.0.0.1:99999'}", "api.listen", "1-65535"),
        ("api: {listen: '::1:9470'}", "api.listen", "brackets"),
        ("api: {max_body_bytes: 100}", "api.max_body_bytes", "must be >= 1024"),
        (
            "api: {tokens: [{name: ops, permissions: [trip]}]}",
            "api.tokens[0]",
            "exactly one of token_file, token_env, token",
        ),
        (
            OPS_ROW % "token: x, permissions: [trip]",
            "api.tokens[0]",
            "exactly one",
        ),
        (OPS_ROW % "permissions: []", "api.tokens[0].permissions", "non-empty"),
        (
            OPS_ROW % "permissions: [trip, admin]",
            "api.tokens[0].permissions[1]",
            "'admin'",
        ),
        (
            OPS_ROW % "permissions: [trip], scope: all",
            "api.tokens[0].scope",
            "unknown key",
        ),
        (
            "api: {tokens: [{name: a, token_env: KS_TEST_TOKEN, permissions: [trip]},"
            " {name: a, token: other, permissions: [trip]}]}",
            "api.tokens[1].name",
            "duplicate token name 'a'",
        ),
        (
            "api: {tokens: [{name: a, token_env: KS_TEST_TOKEN, permissions: [trip]},"
            " {name: b, token: env-token-value, permissions: [trip]}]}",
            "api.tokens[1].token",
            "same secret as api.tokens[0]",
        ),
        (
            "api: {tokens: [{name: a, token: '  ', permissions: [trip]}]}",
            "api.tokens[0].token",
            "the secret is empty",
        ),
        # triggers
        ("triggers: {signal: 1}", "triggers.signal", "must be true or false"),
        (
            "triggers: {alertmanager: {match: {severity: 1}}}",
            "triggers.alertmanager.match.severity",
            "string: string",
        ),
        (
            "triggers: {grafana: {hmac_secret_env: KS_TEST_UNSET}}",
            "triggers.grafana.hmac_secret_env",
            "KS_TEST_UNSET is not set",
        ),
        (
            "triggers: {pnl: [{name: desk, path: p}]}",
            "triggers.pnl[0].max_loss",
            "required",
        ),
        (
            "triggers: {pnl: [{name: desk, max_loss: 1}]}",
            "triggers.pnl[0].path",
            "required",
        ),
        (PNL % "max_drawdown: 0", "triggers.pnl[0].max_drawdown", "must be > 0"),
        (
            PNL % "poll_interval_seconds: 0",
            "triggers.pnl[0].poll_interval_seconds",
            "> 0",
        ),
        (
            PNL % "stale_after_seconds: -1",
            "triggers.pnl[0].stale_after_seconds",
            ">= 0",
        ),
        (
            PNL % "breach_confirmations: 0",
            "triggers.pnl[0].breach_confirmations",
            ">= 1",
        ),
        (PNL % "accounts: [BINANCE, NOPE]", "triggers.pnl[0].accounts[1]", "'NOPE'"),
        (PNL % "accounts: []", "triggers.pnl[0].accounts", "non-empty"),
        (
            "triggers: {pnl: [{name: d, path: p, max_loss: 1},"
            " {name: d, path: q, max_loss: 1}]}",
            "triggers.pnl[1].name",
            "duplicate watcher name 'd'",
        ),
        # log
        ("log: {format: text}", "log.format", "'text' must be one of json, console"),
        ("log: {level: verbose}", "log.level", "must be one of debug, info"),
    ],
)
def test_load_config_reports_key_path_of_bad_value(
    tmp_path: Path, snippet: str, key_path: str, message: str
) -> None:
    """Each broken rule is reported once, prefixed with the key path that breaks it."""
    (problem,) = problems_of(config_with(tmp_path, snippet))
    assert problem.startswith(f"{key_path}: "), problem
    assert message in problem


def test_load_config_reports_the_spec_examples_verbatim(tmp_path: Path) -> None:
    """The messages quoted in SPEC.md and the house style come out word for word."""
    snippet = "accounts: [A, '', A]\n" + PNL % "max_drawdown: 1"
    problems = problems_of(config_with(tmp_path, snippet.replace("100", "0")))
    assert problems == (
        "accounts[1]: '' must be non-empty",
        "accounts[2]: duplicate account 'A'",
        "triggers.pnl[0].max_loss: must be > 0",
    )


def test_load_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    """Problems in different sections all land in one ConfigError."""
    path = write_config(
        tmp_path,
        "ems: {default: {base_url: 'ftp://h'}}\n"
        "accounts: [A, A]\n"
        "retry: {max_atempts: 3}\n"
        "api: {listen: nowhere}\n"
        "log: {level: loud}\n",
    )
    problems = problems_of(path)
    assert [problem.split(": ")[0] for problem in problems] == [
        "ems.default.base_url",
        "accounts[1]",
        "api.listen",
        "state_dir",
        "log.level",
        "retry.max_atempts",
    ]
    assert "retry.max_atempts: unknown key (did you mean 'max_attempts'?)" in problems


def test_load_config_unreadable_file_names_the_file(tmp_path: Path) -> None:
    """A missing config file is one ConfigError naming the file and the reason."""
    path = tmp_path / "absent.yaml"
    assert problems_of(path) == (f"{path}: cannot read: No such file or directory",)


def test_load_config_invalid_yaml_reports_line_without_text(tmp_path: Path) -> None:
    """A YAML syntax error gives file, line and column but never quotes the file."""
    path = write_config(tmp_path, "state_dir: s\nems:\n  api_key: secret-value: x\n")
    (problem,) = problems_of(path)
    assert problem == (
        f"{path}:3:24: invalid YAML: mapping values are not allowed here"
    )


def test_load_config_duplicate_key_is_an_error(tmp_path: Path) -> None:
    """A key given twice in one mapping is rejected instead of the last one winning."""
    path = write_config(tmp_path, "state_dir: a\nstate_dir: b\n")
    assert problems_of(path) == (
        f"{path}:2:1: invalid YAML: found duplicate key 'state_dir'",
    )


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_load_config_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    """An empty file or a top-level list or scalar is one clear problem."""
    (problem,) = problems_of(write_config(tmp_path, text))
    assert "must be a mapping of settings" in problem


def test_load_config_minimal_file_gets_defaults(tmp_path: Path) -> None:
    """Every optional section falls back to the dataclass defaults."""
    config = load_config(config_with(tmp_path, ""))
    assert config.accounts == (
        AccountConfig(exchange_id="BINANCE"),
        AccountConfig(exchange_id="KRAKEN/JOHN"),
    )
    assert config.ems["default"].api_key is None
    assert config.ems["default"].timeout_seconds == 2.0
    assert (config.retry, config.sweep, config.log) == (
        RetryConfig(),
        SweepConfig(),
        LogConfig(),
    )
    assert config.api == ApiConfig()
    assert (config.api.host, config.api.port) == ("127.0.0.1", 9470)
    assert config.triggers.signal is True
    assert config.triggers.alertmanager is None
    assert config.triggers.grafana is None
    assert config.triggers.pnl == ()
    assert config.state_dir == tmp_path / "state"
    assert config.halt_file is None
    assert config.warnings == ()


def test_load_config_resolves_paths_against_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths mean the config file's directory, not the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    snippet = "halt_file: ../run/halted\n" + PNL % "field: value"
    config = load_config(config_with(tmp_path / "etc", snippet))
    assert config.state_dir == tmp_path / "etc" / "state"
    assert config.halt_file == tmp_path / "run" / "halted"
    assert config.triggers.pnl[0].path == tmp_path / "etc" / "pnl.json"
    assert config.triggers.pnl[0].field == "value"


def test_load_config_strips_trailing_slash_of_base_url(tmp_path: Path) -> None:
    """base_url is stored without a trailing slash so paths can be appended."""
    snippet = "ems: {default: {base_url: 'https://ems.example.com/prefix/'}}"
    config = load_config(config_with(tmp_path, snippet))
    assert config.ems["default"].base_url == "https://ems.example.com/prefix"


def test_secret_file_strips_trailing_newline_and_resolves_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A *_file secret is read relative to the config with its newline removed."""
    monkeypatch.chdir("/")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "coinapi.key").write_text("file-key-value\n")
    (tmp_path / "secrets" / "ops.token").write_text(f"{FILE_BEARER}\r\n\n")
    snippet = (
        "ems: {default: {base_url: 'https://h', api_key_file: secrets/coinapi.key}}\n"
        "api: {tokens: [{name: ops, token_file: secrets/ops.token,"
        " permissions: [status]}]}"
    )
    config = load_config(config_with(tmp_path, snippet))
    assert config.ems["default"].api_key == "file-key-value"
    assert config.api.tokens[0].token == FILE_BEARER
    assert config.api.tokens[0].permissions == frozenset({"status"})
    assert config.warnings == ()


def test_secret_env_reads_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A *_env secret is the variable's value, surrounding whitespace stripped."""
    monkeypatch.setenv("KS_TEST_HMAC", f" {ENV_HMAC}\n")
    snippet = (
        "api: {tokens: [{name: ops, token_env: KS_TEST_TOKEN, permissions: [trip]}]}\n"
        "triggers: {grafana: {hmac_secret_env: KS_TEST_HMAC}}"
    )
    config = load_config(config_with(tmp_path, snippet))
    assert config.api.tokens[0].token == ENV_BEARER
    assert config.triggers.grafana is not None
    assert config.triggers.grafana.hmac_secret == ENV_HMAC
    assert config.warnings == ()


def test_secret_inline_is_allowed_with_a_warning(tmp_path: Path) -> None:
    """Inline secrets load but each one adds a warning naming its key path."""
    snippet = (
        "ems: {default: {base_url: 'https://h', api_key: inline-key}}\n"
        "api: {tokens: [{name: a, token: inline-token, permissions: [trip]}]}\n"
        "triggers: {grafana: {hmac_secret: inline-hmac}}"
    )
    config = load_config(config_with(tmp_path, snippet))
    assert config.warnings == (
        "ems.default.api_key: inline secret;"
        " use api_key_file or api_key_env in production",
        "api.tokens[0].token: inline secret; use token_file or token_env in production",
        "triggers.grafana.hmac_secret: inline secret;"
        " use hmac_secret_file or hmac_secret_env in production",
    )
    assert all(
        secret not in repr(config)
        for secret in ["inline-key", "inline-token", "inline-hmac"]
    )


def test_secret_over_plain_http_warns(tmp_path: Path) -> None:
    """An API key sent to an http:// EMS loads with a warning."""
    snippet = "ems: {default: {base_url: 'http://h', api_key_env: KS_TEST_TOKEN}}"
    config = load_config(config_with(tmp_path, snippet))
    assert config.warnings == (
        "ems.default.base_url: the api key would be sent over plain http",
    )


def test_secret_values_never_appear_in_errors_or_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No secret value leaks into a problem, a warning, repr() or redacted()."""
    monkeypatch.setenv("KS_TEST_BAD", "bad\nsecret-in-env")
    (tmp_path / "k").write_text("secret-in-file\n")
    secrets = ["secret-in-env", "secret-in-file", "env-token-value", "1234567890"]
    snippet = (
        "ems: {default: {base_url: 'https://h', api_key_file: k},"
        " other: {base_url: 'https://h', api_key_env: KS_TEST_BAD}}\n"
        "api: {tokens: [{name: a, token_env: KS_TEST_TOKEN, permissions: [trip]},"
        " {name: b, token: env-token-value, permissions: [trip]},"
        " {name: c, token: 1234567890, permissions: [trip]}]}\n"
    )
    error_text = "\n".join(problems_of(config_with(tmp_path, snippet)))
    assert "api.tokens[1].token: same secret as api.tokens[0]" in error_text
    assert "ems.other.api_key_env: the secret must be printable ASCII" in error_text
    assert "api.tokens[2].token: must be a string, got integer" in error_text
    fixed = snippet.replace("KS_TEST_BAD", "KS_TEST_TOKEN").replace(
        ", {name: b, token: env-token-value, permissions: [trip]}", ""
    )
    config = load_config(config_with(tmp_path, fixed.replace("1234567890", "'x'")))
    shown = [yaml.safe_dump(redacted(config)), repr(config), *config.warnings]
    for secret in secrets:
        assert all(secret not in text for text in [error_text, *shown]), secret
    assert config.ems["default"].api_key == "secret-in-file"


def test_redacted_replaces_every_secret_and_is_yaml_dumpable(tmp_path: Path) -> None:
    """redacted() shows where secrets are set, as "<redacted>", and plain values."""
    data = redacted(load_config(example_copy(tmp_path)))
    dumped = yaml.safe_dump(data)
    assert all(value not in dumped for value in EXAMPLE_SECRETS.values())
    assert data["ems"]["default"]["api_key"] == REDACTED
    assert [t["token"] for t in data["api"]["tokens"]] == [REDACTED] * 3
    assert data["triggers"]["grafana"]["hmac_secret"] == REDACTED
    assert data["api"]["listen"] == "127.0.0.1:9470"
    assert data["api"]["tokens"][2]["permissions"] == ["trip", "reset", "status"]
    assert data["state_dir"] == "/var/lib/killswitch"
    assert data["triggers"]["pnl"][0]["accounts"] == ["BINANCE", "KRAKEN/JOHN"]


def test_listen_accepts_ipv6_in_brackets(tmp_path: Path) -> None:
    """ "[::1]:9470" binds ::1 and redacted() writes the brackets back."""
    config = load_config(config_with(tmp_path, "api: {listen: '[::1]:9471'}"))
    assert (config.api.host, config.api.port) == ("::1", 9471)
    assert redacted(config)["api"]["listen"] == "[::1]:9471"


def test_demo_config_loads_as_shipped() -> None:
    """config/demo.yaml loads unchanged, with its inline demo tokens flagged."""
    config = load_config(CONFIG_DIR / "demo.yaml")
    assert config.account_ids == (
        "BINANCE",
        "KRAKEN/JOHN",
        "COINBASE",
        "BITSTAMP/2574",
        "OKX",
        "BYBIT/DESK1",
        "KUCOIN",
        "DERIBIT/OPT",
    )
    assert config.ems["default"].base_url == "http://127.0.0.1:9480"
    assert config.ems["default"].api_key is None
    assert [t.name for t in config.api.tokens] == ["risk-engine", "oncall"]
    assert (
        config.triggers.pnl[0].path == CONFIG_DIR.parent / "var" / "demo" / "pnl.json"
    )
    assert config.state_dir == CONFIG_DIR.parent / "var" / "demo" / "state"
    assert config.log.format == "console"
    assert len(config.warnings) == 2


def test_example_config_loads_with_its_credential_files(tmp_path: Path) -> None:
    """The production template loads once its credential files exist, warning-free."""
    config = load_config(example_copy(tmp_path))
    assert config.warnings == ()
    assert config.ems["default"].api_key == EXAMPLE_SECRETS["coinapi.key"]
    assert [t.name for t in config.api.tokens] == [
        "risk-engine",
        "alertmanager",
        "oncall",
    ]
    assert config.api.tokens[2].permissions == frozenset({"trip", "reset", "status"})
    assert config.triggers.grafana is not None
    assert config.triggers.grafana.hmac_secret == EXAMPLE_SECRETS["grafana.hmac"]
    assert config.state_dir == Path("/var/lib/killswitch")
    assert config.halt_file == Path("/run/killswitch/halted")
    assert config.triggers.alertmanager is not None
    assert dict(config.triggers.alertmanager.match) == {"severity": "critical"}
    assert config.triggers.pnl[0].accounts == ("BINANCE", "KRAKEN/JOHN")


def test_example_config_without_credentials_names_each_file(tmp_path: Path) -> None:
    """With no credential files, every missing one is named in one error."""
    credentials = tmp_path / "credentials"
    problems = problems_of(example_copy(tmp_path, with_secrets=False))
    assert problems == tuple(
        f"{key_path}: cannot read {credentials / name}: No such file or directory"
        for key_path, name in zip(
            [
                "ems.default.api_key_file",
                "api.tokens[0].token_file",
                "api.tokens[1].token_file",
                "api.tokens[2].token_file",
                "triggers.grafana.hmac_secret_file",
            ],
            EXAMPLE_SECRETS,
            strict=True,
        )
    )


def test_load_config_client_mode_skips_the_ems_key(tmp_path: Path) -> None:
    """Client commands load a config whose EMS key file they cannot read."""
    path = tmp_path / "k.yaml"
    (tmp_path / "token").write_text("tok-123\n")
    path.write_text(
        "ems: {default: {base_url: 'http://127.0.0.1:1', "
        "api_key_file: /nonexistent/coinapi.key}}\n"
        "accounts: [BINANCE]\n"
        "api: {tokens: [{name: oncall, token_file: token, permissions: [status]}]}\n"
        "state_dir: state\n"
    )
    with pytest.raises(ConfigError, match="api_key_file"):
        load_config(path)
    cfg = load_config(path, client=True)
    assert cfg.ems["default"].api_key is None
    assert cfg.api.tokens[0].token == "tok-123"


def test_load_config_never_echoes_a_secret_pasted_as_an_env_name(
    tmp_path: Path,
) -> None:
    """A secret written where a variable name belongs is not repeated in the error."""
    path = tmp_path / "k.yaml"
    path.write_text(
        "ems: {default: {base_url: 'http://127.0.0.1:1', "
        "api_key_env: 'sk-live/9f8e+7d6c=='}}\n"
        "accounts: [BINANCE]\nstate_dir: state\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "ems.default.api_key_env" in str(info.value)
    assert "sk-live" not in str(info.value)
