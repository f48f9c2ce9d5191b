"""Frozen configuration dataclasses and load_config(): the only YAML reader.

Every problem found in a config file is collected with its key path
(`triggers.pnl[0].max_loss: must be > 0`) and raised as one ConfigError, so an
operator fixes the whole file in one pass. Secret values never appear in a
problem, a warning or the redacted view.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from killswitch.errors import ConfigError

Permission = Literal["trip", "reset", "status"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EmsConfig:
    """One EMS endpoint; `api_key` None means a self-hosted gateway (no header)."""

    name: str
    base_url: str  # without a trailing slash
    api_key: str | None = field(default=None, repr=False)
    timeout_seconds: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountConfig:
    """One exchange account id as the EMS knows it (`KRAKEN/JOHN`)."""

    exchange_id: str
    ems: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Per-account retry policy for cancel-all."""

    max_attempts: int = 6
    backoff_initial_seconds: float = 0.05
    backoff_max_seconds: float = 1.0
    max_attempts_other: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepConfig:
    """One sweep: cancel, retry, verify, all accounts, within a deadline."""

    deadline_seconds: float = 15.0
    verify: bool = True
    verify_attempts: int = 3
    resweep_interval_seconds: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    """An API bearer token and what it may do."""

    name: str
    token: str = field(repr=False)
    permissions: frozenset[Permission]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    """The daemon's one HTTP listener."""

    host: str = "127.0.0.1"
    port: int = 9470
    max_body_bytes: int = 65536
    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertmanagerConfig:
    """Firing alerts whose labels include every `match` pair trip; {} matches any."""

    match: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class GrafanaConfig:
    """Grafana alerting webhook contact point, optionally HMAC-signed."""

    match: Mapping[str, str] = field(default_factory=dict)
    hmac_secret: str | None = field(default=None, repr=False)
    hmac_header: str = "X-Grafana-Alerting-Signature"
    timestamp_header: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PnlWatcherConfig:
    """One PnL file to watch and the limits that trip."""

    name: str
    path: Path
    field: str = "pnl"
    max_loss: float
    max_drawdown: float | None = None
    stale_after_seconds: float = 30.0
    unreadable_grace_seconds: float = 2.0
    poll_interval_seconds: float = 0.25
    breach_confirmations: int = 1
    accounts: tuple[str, ...] | None = None  # None = every account


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggersConfig:
    """Which triggers are armed; an absent webhook section disables that endpoint."""

    signal: bool = True
    alertmanager: AlertmanagerConfig | None = None
    grafana: GrafanaConfig | None = None
    pnl: tuple[PnlWatcherConfig, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Log output format and level."""

    format: LogFormat = "json"
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    ems: Mapping[str, EmsConfig]
    accounts: tuple[AccountConfig, ...]
    retry: RetryConfig = RetryConfig()
    sweep: SweepConfig = SweepConfig()
    api: ApiConfig = ApiConfig()
    triggers: TriggersConfig = TriggersConfig()
    state_dir: Path
    halt_file: Path | None = None
    log: LogConfig = LogConfig()
    # non-fatal findings (inline secrets) that check-config and start-up print
    warnings: tuple[str, ...] = ()

    @property
    def account_ids(self) -> tuple[str, ...]:
        """Every configured exchange account id, in config order."""
        return tuple(account.exchange_id for account in self.accounts)


REDACTED = "<redacted>"

_PERMISSIONS: tuple[Permission, ...] = ("trip", "reset", "status")
_LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
_LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# defaults of the dataclasses whose required fields forbid a bare instance
_EMS_DEFAULTS = EmsConfig(name="", base_url="")
_PNL_DEFAULTS = PnlWatcherConfig(name="", path=Path(), max_loss=1.0)


def load_config(path: Path | str, *, client: bool = False) -> Config:
    """Read and validate the YAML config at `path`, secrets included.

    Relative paths in the file are resolved against the file's directory;
    `*_file` secrets are read and `*_env` secrets looked up now, so a config that
    loads is one the daemon can run with. With `client`, only the API tokens
    are read (the EMS key and the Grafana secret come back None): what the
    `trip`, `status` and `reset` commands need.

    Raises:
        ConfigError: the file cannot be read or parsed, or breaks a rule;
            `problems` lists every problem, each prefixed with its key path.
    """
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{config_path}: cannot read: {exc.strerror or type(exc).__name__}"
        raise ConfigError([msg]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{config_path}: not UTF-8 text"]) from exc
    try:
        # SafeLoader plus a duplicate-key check: a repeated key must not win silently
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(config_path, exc)]) from exc
    except ValueError as exc:
        # PyYAML's own converters (dates, ints) raise ValueError; its text may
        # quote the value, so it is not repeated here
        msg = f"{config_path}: invalid YAML: a value cannot be converted (quote it)"
        raise ConfigError([msg]) from exc
    if not isinstance(data, dict):
        msg = f"{config_path}: must be a mapping of settings, got {_kind(data)}"
        raise ConfigError([msg])
    ctx = _Context(
        base_dir=config_path.absolute().parent,
        unread_secrets=frozenset({"api_key", "hmac_secret"}) if client else frozenset(),
    )
    config = _config(_Section(ctx, "", data))
    for section in ctx.sections:
        section.report_unknown_keys()
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return config


def redacted(config: Config) -> dict[str, Any]:
    """Return the effective config as plain YAML-dumpable data, secrets redacted.

    Every secret (`api_key`, `token`, `hmac_secret`) that is set reads
    "<redacted>"; paths are strings and `api.listen` is "host:port" again.
    """
    api, triggers = config.api, config.triggers
    am, grafana = triggers.alertmanager, triggers.grafana
    host = f"[{api.host}]" if ":" in api.host else api.host
    return {
        "ems": {
            name: {
                "base_url": ems.base_url,
                "api_key": _redact(ems.api_key),
                "timeout_seconds": ems.timeout_seconds,
            }
            for name, ems in config.ems.items()
        },
        "accounts": [{"id": a.exchange_id, "ems": a.ems} for a in config.accounts],
        "retry": _scalars(config.retry),
        "sweep": _scalars(config.sweep),
        "api": {
            "listen": f"{host}:{api.port}",
            "max_body_bytes": api.max_body_bytes,
            "tokens": [
                {
                    "name": token.name,
                    "token": REDACTED,
                    "permissions": [p for p in _PERMISSIONS if p in token.permissions],
                }
                for token in api.tokens
            ],
        },
        "triggers": {
            "signal": triggers.signal,
            "alertmanager": None if am is None else {"match": dict(am.match)},
            "grafana": None
            if grafana is None
            else {
                "match": dict(grafana.match),
                "hmac_secret": _redact(grafana.hmac_secret),
                "hmac_header": grafana.hmac_header,
                "timestamp_header": grafana.timestamp_header,
            },
            "pnl": [
                _scalars(watcher)
                | {
                    "path": str(watcher.path),
                    "accounts": None
                    if watcher.accounts is None
                    else [*watcher.accounts],
                }
                for watcher in triggers.pnl
            ],
        },
        "state_dir": str(config.state_dir),
        "halt_file": None if config.halt_file is None else str(config.halt_file),
        "log": _scalars(config.log),
    }


def _redact(secret: str | None) -> str | None:
    return None if secret is None else REDACTED


def _scalars(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping.

    Plain YAML keeps the last value, so a repeated `max_loss:` would win silently.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, Any]:
        """Construct a mapping after checking that no scalar key repeats."""
        keys: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in keys:
                    problem = f"found duplicate key {key_node.value!r}"
                    raise yaml.constructor.ConstructorError(
                        problem=problem, problem_mark=key_node.start_mark
                    )
                keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """Describe a YAML error by file, line and column, never quoting the file's text."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        detail = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {detail}"
    return f"{path}: invalid YAML ({type(exc).__name__})"


def _kind(value: object) -> str:
    """Name a YAML value's type for a problem message, never the value itself."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    names |= {list: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@dataclass(slots=True)
class _Context:
    """What reading one config file collects: problems, warnings, sections read."""

    base_dir: Path
    # Secrets not to read (the client commands need only the API tokens).
    unread_secrets: frozenset[str] = frozenset()
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sections: list[_Section] = field(default_factory=list)

    def problem(self, key_path: str, message: str) -> None:
        """Record one problem at `key_path`."""
        self.problems.append(f"{key_path}: {message}")

    def resolve(self, value: str) -> Path:
        """Resolve a path from the file against the config file's directory."""
        path = Path(value)
        return path if path.is_absolute() else (self.base_dir / path).resolve()


class _Section:
    """One YAML mapping, read key by key; every problem is recorded with its key path.

    Scalar readers treat an absent key and `null` alike (the default applies) and
    return a placeholder after recording a problem, so reading goes on and every
    problem in the file is found in one pass.
    """

    def __init__(self, ctx: _Context, path: str, data: object) -> None:
        self.ctx = ctx
        self.path = path
        self.is_mapping = isinstance(data, dict)
        self._data: dict[Any, Any] = data if isinstance(data, dict) else {}
        self._known: set[str] = set()
        if not self.is_mapping:
            ctx.problem(path, f"must be a mapping, got {_kind(data)}")
        ctx.sections.append(self)

    def at(self, key: str) -> str:
        """Return the key path of `key` in this section."""
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, message: str) -> None:
        """Record a problem at `key`, or at the section itself when `key` is None."""
        self.ctx.problem(self.path if key is None else self.at(key), message)

    def has(self, key: str) -> bool:
        """Tell whether `key` is present, even with a null value."""
        return key in self._data

    def names(self) -> list[Any]:
        """Return every key, each then counting as known (for mappings of names)."""
        self._known.update(str(key) for key in self._data)
        return list(self._data)

    def get(self, key: str) -> Any:
        """Return the raw value of `key` (None when absent) and mark the key known."""
        self._known.add(key)
        return self._data.get(key)

    def report_unknown_keys(self) -> None:
        """Record every key that no reader asked for."""
        for key in self._data:
            if str(key) not in self._known:
                close = difflib.get_close_matches(str(key), self._known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(str(key), f"unknown key{hint}")

    def section(self, key: str) -> _Section:
        """Return the mapping under `key`; an absent key reads as an empty mapping."""
        self._known.add(key)
        return _Section(self.ctx, self.at(key), self._data.get(key, {}))

    def items(
        self, key: str, *, required: bool = False, nonempty: bool = False
    ) -> list[tuple[str, Any]]:
        """Return the list under `key` as (key path, item) pairs; [] when absent."""
        value = self.get(key)
        if value is None:
            if required:
                self.problem(key, "is required")
            return []
        if not isinstance(value, list):
            self.problem(key, f"must be a list, got {_kind(value)}")
            return []
        if nonempty and not value:
            self.problem(key, "must be a non-empty list")
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value)]

    def text(self, key: str, default: str | None = None) -> str:
        """Return a non-blank string; a None `default` makes the key required."""
        value = self.get(key)
        if value is None:
            if default is None:
                self.problem(key, "is required")
            return default or ""
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {_kind(value)}")
            return default or ""
        if not value.strip():
            self.problem(key, f"{value!r} must be non-empty")
        return value

    def optional_text(self, key: str) -> str | None:
        """Return a non-blank string, or None when the key is absent or null."""
        return None if self.get(key) is None else self.text(key)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """Return one of `choices`."""
        value = self.get(key)
        if value is None:
            return default
        if value not in choices:
            self.problem(key, f"{value!r} must be one of {', '.join(choices)}")
            return default
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        """Return true or false (YAML booleans only, not 0/1 or "yes")."""
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {_kind(value)}")
            return default
        return value

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        """Return an integer >= `minimum` (a boolean is not an integer)."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be an integer, got {_kind(value)}")
            return default
        if value < minimum:
            self.problem(key, f"must be >= {minimum}")
        return value

    def number(
        self, key: str, default: float | None, *, positive: bool = False
    ) -> float:
        """Return a finite float >= 0 (> 0 when `positive`).

        A None `default` makes the key required.
        """
        value = self.get(key)
        if value is None:
            if default is None:
                self.problem(key, "is required")
            return default or 0.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be a number, got {_kind(value)}")
            return default or 0.0
        if not math.isfinite(value):
            self.problem(key, "must be a finite number")
        elif positive and value <= 0:
            self.problem(key, "must be > 0")
        elif value < 0:
            self.problem(key, "must be >= 0")
        return float(value)

    def path_value(self, key: str) -> Path:
        """Return a required path, resolved against the config file's directory."""
        return self.ctx.resolve(self.text(key))

    def labels(self, key: str) -> dict[str, str]:
        """Return a mapping of label names to label values ({} when absent)."""
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping of label: value, got {_kind(value)}")
            return {}
        labels: dict[str, str] = {}
        for name, label in value.items():
            if not isinstance(name, str) or not isinstance(label, str):
                got = f"{_kind(name)}: {_kind(label)}"
                self.problem(f"{key}.{name}", f"must be string: string, got {got}")
            else:
                labels[name] = label
        return labels

    def secret(
        self, name: str, *, required: bool, header: bool
    ) -> tuple[str, str] | None:
        """Return (value, key path) of a secret, or None if it is absent or unusable.

        The secret is given as `<name>_file`, `<name>_env` or inline `<name>`. A
        `header` secret is sent in an HTTP header, so it must be printable ASCII.
        """
        keys = (f"{name}_file", f"{name}_env", name)
        given = [key for key in keys if self.get(key) is not None]
        if len(given) > 1 or (required and not given):
            how_many = "exactly" if required else "at most"
            self.problem(None, f"set {how_many} one of {', '.join(keys)}")
        if len(given) != 1 or name in self.ctx.unread_secrets:
            return None
        key = given[0]
        value = self._read_secret(key, self.get(key), name)
        if value is None:
            return None
        value = value.strip()
        if not value:
            self.problem(key, "the secret is empty")
            return None
        if header and not all(" " <= char <= "~" for char in value):
            self.problem(key, "the secret must be printable ASCII (an HTTP header)")
            return None
        return value, self.at(key)

    def _read_secret(self, key: str, value: object, name: str) -> str | None:
        if key.endswith("_env"):
            variable = self.text(key)
            if not variable.strip():
                return None
            if not _ENV_NAME.fullmatch(variable):
                # Likely the secret itself pasted in: never repeat it.
                self.problem(key, "not a valid environment variable name")
                return None
            secret = os.environ.get(variable)
            if secret is None:
                self.problem(key, f"environment variable {variable} is not set")
            return secret
        if key.endswith("_file"):
            path = self.path_value(key)
            try:
                return path.read_text(encoding="utf-8")
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                self.problem(key, f"cannot read {path}: {reason}")
            except UnicodeDecodeError:
                self.problem(key, f"cannot read {path}: not UTF-8 text")
            return None
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {_kind(value)}")
            return None
        advice = f"use {name}_file or {name}_env in production"
        self.ctx.warnings.append(f"{self.at(key)}: inline secret; {advice}")
        return value


def _config(root: _Section) -> Config:
    ems = _ems(root)
    accounts = _accounts(root, ems)
    account_ids = {account.exchange_id for account in accounts}
    retry = _retry(root.section("retry"))
    sweep = _sweep(root.section("sweep"))
    api = _api(root.section("api"))
    triggers = _triggers(root.section("triggers"), account_ids)
    state_dir = root.path_value("state_dir")
    halt_file = None if root.get("halt_file") is None else root.path_value("halt_file")
    log = _log(root.section("log"))
    return Config(
        ems=MappingProxyType(ems),
        accounts=accounts,
        retry=retry,
        sweep=sweep,
        api=api,
        triggers=triggers,
        state_dir=state_dir,
        halt_file=halt_file,
        log=log,
        warnings=tuple(root.ctx.warnings),
    )


def _ems(root: _Section) -> dict[str, EmsConfig]:
    section = root.section("ems")
    endpoints: dict[str, EmsConfig] = {}
    for name in section.names():
        if not isinstance(name, str) or not name.strip():
            section.problem(None, f"endpoint name {name!r} must be a non-empty string")
            continue
        endpoint = section.section(name)
        base_url = _base_url(endpoint)
        api_key = endpoint.secret("api_key", required=False, header=True)
        if api_key is not None and base_url.startswith("http://"):
            plain = "the api key would be sent over plain http"
            root.ctx.warnings.append(f"{endpoint.at('base_url')}: {plain}")
        endpoints[name] = EmsConfig(
            name=name,
            base_url=base_url,
            api_key=None if api_key is None else api_key[0],
            timeout_seconds=endpoint.number(
                "timeout_seconds", _EMS_DEFAULTS.timeout_seconds, positive=True
            ),
        )
    if section.is_mapping and not endpoints and not section.names():
        section.problem(None, "at least one EMS endpoint is required")
    return endpoints


def _base_url(endpoint: _Section) -> str:
    # the URL itself is never quoted: it might carry credentials
    url = endpoint.text("base_url")
    if not url.strip():
        return ""
    try:
        parts = urlsplit(url)
        has_credentials = parts.username is not None or parts.password is not None
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        endpoint.problem("base_url", "is not a valid URL")
        return url
    if has_credentials:
        endpoint.problem("base_url", "must not carry credentials; use api_key_file")
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        endpoint.problem("base_url", "must be an http:// or https:// URL with a host")
    elif parts.query or parts.fragment:
        endpoint.problem("base_url", "must not have a query or a fragment")
    return url.rstrip("/")


def _accounts(
    root: _Section, ems: Mapping[str, EmsConfig]
) -> tuple[AccountConfig, ...]:
    accounts: list[AccountConfig] = []
    seen: set[str] = set()
    for path, item in root.items("accounts", required=True, nonempty=True):
        if isinstance(item, dict):
            account = _Section(root.ctx, path, item)
            raw_id = account.get("id")
            if raw_id is None:
                account.problem("id", "is required")
            exchange_id = _exchange_id(root.ctx, account.at("id"), raw_id)
            ems_name, ems_path = account.text("ems", "default"), account.at("ems")
        else:
            exchange_id = _exchange_id(root.ctx, path, item)
            ems_name, ems_path = "default", path
        if exchange_id is None:
            continue
        if exchange_id in seen:
            root.ctx.problem(path, f"duplicate account {exchange_id!r}")
        elif ems and ems_name not in ems:  # no endpoint at all is reported once
            configured = ", ".join(ems) or "none"
            message = f"unknown ems {ems_name!r} (configured: {configured})"
            root.ctx.problem(ems_path, message)
        seen.add(exchange_id)
        accounts.append(AccountConfig(exchange_id=exchange_id, ems=ems_name))
    return tuple(accounts)


def _exchange_id(ctx: _Context, key_path: str, value: object) -> str | None:
    """Return `value` if it is a usable EMS exchange id (`KRAKEN/JOHN`), else None."""
    if value is None:
        return None
    if not isinstance(value, str):
        ctx.problem(
            key_path, f"must be a string or an {{id, ems}} mapping, got {_kind(value)}"
        )
    elif not value:
        ctx.problem(key_path, "'' must be non-empty")
    elif any(char.isspace() for char in value):
        ctx.problem(key_path, f"{value!r} must not contain whitespace")
    else:
        return value
    return None


def _retry(section: _Section) -> RetryConfig:
    default = RetryConfig()
    initial = section.number(
        "backoff_initial_seconds", default.backoff_initial_seconds, positive=True
    )
    maximum = section.number("backoff_max_seconds", default.backoff_max_seconds)
    if maximum < initial:
        message = f"must be >= backoff_initial_seconds ({initial:g})"
        section.problem("backoff_max_seconds", message)
    return RetryConfig(
        max_attempts=section.integer("max_attempts", default.max_attempts, minimum=1),
        backoff_initial_seconds=initial,
        backoff_max_seconds=maximum,
        max_attempts_other=section.integer(
            "max_attempts_other", default.max_attempts_other, minimum=1
        ),
    )


def _sweep(section: _Section) -> SweepConfig:
    default = SweepConfig()
    return SweepConfig(
        deadline_seconds=section.number(
            "deadline_seconds", default.deadline_seconds, positive=True
        ),
        verify=section.boolean("verify", default.verify),
        verify_attempts=section.integer(
            "verify_attempts", default.verify_attempts, minimum=1
        ),
        resweep_interval_seconds=section.number(
            "resweep_interval_seconds", default.resweep_interval_seconds
        ),
    )


def _api(section: _Section) -> ApiConfig:
    default = ApiConfig()
    host, port = _listen(section, default)
    tokens: list[TokenConfig] = []
    names: set[str] = set()
    owners: dict[str, str] = {}  # secret -> key path of the token that has it
    for path, item in section.items("tokens"):
        entry = _Section(section.ctx, path, item)
        name = entry.text("name")
        if name and name in names:
            entry.problem("name", f"duplicate token name {name!r}")
        names.add(name)
        secret = entry.secret("token", required=True, header=True)
        if secret is not None:
            value, key_path = secret
            if value in owners:
                section.ctx.problem(key_path, f"same secret as {owners[value]}")
            owners.setdefault(value, path)
        tokens.append(
            TokenConfig(
                name=name,
                token="" if secret is None else secret[0],
                permissions=_permissions(entry),
            )
        )
    return ApiConfig(
        host=host,
        port=port,
        max_body_bytes=section.integer(
            "max_body_bytes", default.max_body_bytes, minimum=1024
        ),
        tokens=tuple(tokens),
    )


def _listen(section: _Section, default: ApiConfig) -> tuple[str, int]:
    """Split `api.listen` ("127.0.0.1:9470", "[::1]:9470") into host and port."""
    value = section.text("listen", f"{default.host}:{default.port}")
    if not value.strip():
        return default.host, default.port
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
        if ":" in host:
            section.problem("listen", f"{value!r}: write an IPv6 host in brackets")
            return default.host, default.port
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        message = f"{value!r} must be HOST:PORT with a port in 1-65535"
        section.problem("listen", message)
        return default.host, default.port
    return host, int(port)


def _permissions(entry: _Section) -> frozenset[Permission]:
    permissions: set[Permission] = set()
    for path, item in entry.items("permissions", required=True, nonempty=True):
        if item in _PERMISSIONS:
            permissions.add(cast(Permission, item))
        else:
            entry.ctx.problem(
                path, f"{item!r} must be one of {', '.join(_PERMISSIONS)}"
            )
    return frozenset(permissions)


def _triggers(section: _Section, account_ids: set[str]) -> TriggersConfig:
    alertmanager = None
    if section.has("alertmanager"):
        am = section.section("alertmanager")
        alertmanager = AlertmanagerConfig(match=MappingProxyType(am.labels("match")))
    grafana = None
    if section.has("grafana"):
        gf = section.section("grafana")
        secret = gf.secret("hmac_secret", required=False, header=False)
        grafana = GrafanaConfig(
            match=MappingProxyType(gf.labels("match")),
            hmac_secret=None if secret is None else secret[0],
            hmac_header=gf.text("hmac_header", GrafanaConfig().hmac_header),
            timestamp_header=gf.optional_text("timestamp_header"),
        )
    return TriggersConfig(
        signal=section.boolean("signal", TriggersConfig().signal),
        alertmanager=alertmanager,
        grafana=grafana,
        pnl=_pnl_watchers(section, account_ids),
    )


def _pnl_watchers(
    section: _Section, account_ids: set[str]
) -> tuple[PnlWatcherConfig, ...]:
    default = _PNL_DEFAULTS
    watchers: list[PnlWatcherConfig] = []
    names: set[str] = set()
    for path, item in section.items("pnl"):
        watcher = _Section(section.ctx, path, item)
        name = watcher.text("name")
        if name and name in names:
            watcher.problem("name", f"duplicate watcher name {name!r}")
        names.add(name)
        scope: list[str] | None = None
        if watcher.get("accounts") is not None:
            scope = []
            for account_path, account in watcher.items("accounts", nonempty=True):
                if isinstance(account, str) and account in account_ids:
                    scope.append(account)
                else:
                    message = f"unknown account {account!r} (not in accounts)"
                    section.ctx.problem(account_path, message)
        max_drawdown = None
        if watcher.get("max_drawdown") is not None:
            max_drawdown = watcher.number("max_drawdown", None, positive=True)
        watchers.append(
            PnlWatcherConfig(
                name=name,
                path=watcher.path_value("path"),
                field=watcher.text("field", default.field),
                max_loss=watcher.number("max_loss", None, positive=True),
                max_drawdown=max_drawdown,
                stale_after_seconds=watcher.number(
                    "stale_after_seconds", default.stale_after_seconds
                ),
                unreadable_grace_seconds=watcher.number(
                    "unreadable_grace_seconds", default.unreadable_grace_seconds
                ),
                poll_interval_seconds=watcher.number(
                    "poll_interval_seconds",
                    default.poll_interval_seconds,
                    positive=True,
                ),
                breach_confirmations=watcher.integer(
                    "breach_confirmations", default.breach_confirmations, minimum=1
                ),
                accounts=None if scope is None else tuple(scope),
            )
        )
    return tuple(watchers)


def _log(section: _Section) -> LogConfig:
    default = LogConfig()
    return LogConfig(
        format=cast(LogFormat, section.choice("format", default.format, _LOG_FORMATS)),
        level=cast(LogLevel, section.choice("level", default.level, _LOG_LEVELS)),
    )
