"""The provider's TOML configuration: typed sections, each key checked with a message naming it.

Example config (every key optional)::

    listen = "127.0.0.1:50551"
    state = "provider.db"               # SQLite path, "memory", or an SQLAlchemy URL
    key_file = "provider.key"           # provider signing key, created (0600) if missing
    verifier = "zkunlearn.provider.verification:from_config"   # factory(config) -> ProofVerifier
    model_ids = ["mnist-vit"]
    submit_wait_s = 30.0
    grace_s = 5.0
    [tls]
    cert_file = "server.pem"
    key_file = "server.key"
    client_ca_file = "clients-ca.pem"   # enables mTLS
    [limits]
    max_message_bytes = 16777216
    max_proof_bytes = 268435456
    nonce_ttl_s = 120.0
    request_ttl_s = 604800.0
    verify_workers = 2
    max_workers = 16                    # RPC threads
    max_concurrent_rpcs = 0             # 0: 4 x max_workers; beyond it calls fail with RESOURCE_EXHAUSTED
    max_streams = 0                     # Watch, GetArtifact and SubmitProof at once; 0: 3/4 of workers
    watch_max_s = 300.0                 # a watch stream then ends (OK) and the client re-opens it
    stream_timeout_s = 1800.0           # a stream still open after this is cancelled
    [keepalive]
    time_ms = 30000
    timeout_ms = 10000
    [artifacts.group_obs_b64]
    vk = "artifacts/group_obs_b64/vk.key"
    [operator]
    public_keys = ["<64 hex>"]          # operator keys allowed to issue deletions (Operator service)
    key_file = "operator.key"           # the operator CLI's own key
    [planners.mnist-vit]                # how operators' forget orders become masks for this model
    factory = "zkunlearn.scenario:demo_planner"
    quick = false                       # the factory's keyword arguments
"""

from __future__ import annotations

import dataclasses
import math
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zkunlearn.proofs.statements import StatementError, StatementVerifier

from .models import ServiceConfig

__all__ = ["ConfigError", "KeepaliveConfig", "LimitsConfig", "OperatorConfig", "ProviderConfig", "TlsConfig"]


class ConfigError(ValueError):
    """The provider config is malformed or names files that cannot be used."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # non-empty: require and verify client certificates (mTLS)


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 16 * 1024 * 1024
    max_proof_bytes: int = 256 * 1024 * 1024
    nonce_ttl_s: float = 120.0
    challenge_rate_per_peer: float = 200.0  # Challenge calls per second per address (0: no limit)
    challenge_rate_per_subject: float = 10.0  # per client id or operator key (0: no limit)
    request_ttl_s: float = 7 * 24 * 3600.0
    verify_workers: int = 2  # 0: verify nothing here (stand-alone `zkunlearn provider worker`s do)
    verify_lease_s: float = 300.0
    verify_poll_s: float = 0.25
    verify_max_attempts: int = 3
    max_submissions_per_request: int = 16
    max_workers: int = 16  # RPC threads; each open WatchRequests or GetArtifact stream holds one
    # Calls admitted at once (running or queued for a thread); beyond it gRPC answers RESOURCE_EXHAUSTED
    # at once instead of queueing without bound. 0: 4 x max_workers.
    max_concurrent_rpcs: int = 0
    # WatchRequests + GetArtifact + SubmitProof streams at once, below max_workers so unary calls find a
    # thread; excess streams get UNAVAILABLE (retried). 0: max_workers - max(2, max_workers // 4) (12 of 16).
    max_streams: int = 0
    watch_max_s: float = 300.0  # a watch stream ends (status OK) after this; the SDK re-opens it
    stream_timeout_s: float = 1800.0  # a stream still open after this (a stalled reader) is cancelled

    def stream_slots(self) -> int:
        return self.max_streams or max(1, self.max_workers - max(2, self.max_workers // 4))

    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or 4 * self.max_workers


@dataclass(frozen=True)
class KeepaliveConfig:
    time_ms: int = 30_000
    timeout_ms: int = 10_000
    min_ping_interval_ms: int = 10_000


@dataclass(frozen=True)
class OperatorConfig:
    """Who may issue deletion requests, and how the operator CLI reaches and trusts the provider."""

    public_keys: tuple[str, ...] = ()  # raw Ed25519 public keys, hex: the operator keys the server accepts
    key_file: str = "operator.key"  # the CLI's private operator key (`zkunlearn provider operator-key`)
    target: str = ""  # host:port the CLI dials (default: the provider's listen address)
    ca_file: str = ""  # PEM roots the CLI trusts when the provider serves TLS (default: tls.cert_file)
    server_name: str = ""  # TLS name to expect, when it differs from the target's host
    cert_file: str = ""  # the CLI's client certificate, when the provider requires mTLS
    cert_key_file: str = ""


@dataclass(frozen=True)
class ProviderConfig:
    listen: str = "127.0.0.1:50551"
    # Names this replica's verification leases; keep it stable across restarts (default: host:listen).
    replica_id: str = ""
    state: str = "provider.db"
    key_file: str = "provider.key"
    verifier: str = ""
    model_ids: tuple[str, ...] = ()
    submit_wait_s: float = 30.0
    watch_poll_s: float = 0.5
    grace_s: float = 5.0
    srs_digest: str = ""
    srs_insecure: bool = True
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    artifacts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    # [planners.<model_id>]: factory = "package.module:callable" and its keyword arguments
    planners: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProviderConfig:
        config: ProviderConfig = _build(cls, data, "")
        return config

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> ProviderConfig:
        """Read a TOML file (optional) and apply dotted overrides such as ``{"tls.cert_file": "x.pem"}``."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read provider config {path}: {exc}") from exc
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.from_mapping(data)

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            model_ids=tuple(self.model_ids),
            nonce_ttl_s=self.limits.nonce_ttl_s,
            challenge_rate_per_peer=self.limits.challenge_rate_per_peer,
            challenge_rate_per_subject=self.limits.challenge_rate_per_subject,
            request_ttl_s=self.limits.request_ttl_s,
            max_proof_bytes=self.limits.max_proof_bytes,
            verify_workers=self.limits.verify_workers,
            verify_lease_s=self.limits.verify_lease_s,
            verify_poll_s=self.limits.verify_poll_s,
            verify_max_attempts=self.limits.verify_max_attempts,
            max_submissions_per_request=self.limits.max_submissions_per_request,
            replica_id=self.replica_id or _default_replica_id(self.listen),
            srs_digest=self.srs_digest,
            srs_insecure=self.srs_insecure,
        )


def _default_replica_id(listen: str) -> str:
    """Host plus listen address: stable across restarts, distinct for replicas sharing a host."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.:" else "-" for ch in f"{socket.gethostname()}:{listen}")
    return safe[:100]


# Numeric keys that must be > 0; every other numeric key must be >= 0 (0 means "none" or "derived").
_POSITIVE = frozenset(
    {
        "watch_poll_s",
        "limits.max_message_bytes",
        "limits.max_proof_bytes",
        "limits.nonce_ttl_s",
        "limits.request_ttl_s",
        "limits.verify_lease_s",
        "limits.verify_poll_s",
        "limits.verify_max_attempts",
        "limits.max_submissions_per_request",
        "limits.max_workers",
        "limits.watch_max_s",
        "limits.stream_timeout_s",
        "keepalive.time_ms",
        "keepalive.timeout_ms",
        "keepalive.min_ping_interval_ms",
    }
)


def _model_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f'config key model_ids must be a list of strings such as ["mnist-vit"], '
            f"got {type(value).__name__} {str(value)[:80]!r}"
        )
    return tuple(value)


def _artifacts(value: Any) -> dict[str, dict[str, str]]:
    expected = "[artifacts.<circuit_id>] tables mapping artifact names to file paths"
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key artifacts must be {expected}, got {type(value).__name__}")
    out: dict[str, dict[str, str]] = {}
    for circuit, arts in value.items():
        if not isinstance(arts, Mapping):
            raise ConfigError(
                f"config key artifacts.{circuit} must be a table mapping artifact names to file paths, "
                f"got {type(arts).__name__}"
            )
        for name, path in arts.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(
                    f"config key artifacts.{circuit}.{name} must be a file path (string), "
                    f"got {type(path).__name__}"
                )
        out[str(circuit)] = {str(name): path for name, path in arts.items()}
    return out


def _planners(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(
            'config key planners must hold [planners.<model_id>] tables with factory = "module:callable"'
        )
    return {str(model): dict(table) for model, table in value.items()}


def _operator_keys(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"config key operator.public_keys must be a list, got {type(value).__name__}")
    for key in value:
        try:
            StatementVerifier.from_public_bytes(bytes.fromhex(key))
        except (TypeError, ValueError, StatementError) as exc:
            raise ConfigError(
                f"config key operator.public_keys holds {str(key)[:80]!r}, not a 64-hex Ed25519 public key"
            ) from exc
    return tuple(value)


def _check_limits(limits: LimitsConfig) -> None:
    """Cross-key checks: the stream cap must leave RPC threads to unary calls."""
    if limits.max_workers < 2:
        raise ConfigError("config key limits.max_workers must be at least 2 (streams and unary calls)")
    if not limits.stream_slots() < limits.max_workers:
        raise ConfigError(
            f"config key limits.max_streams must be below limits.max_workers ({limits.max_workers}), "
            f"got {limits.stream_slots()}, so unary calls always find a thread"
        )
    if limits.concurrent_rpcs() < limits.max_workers:
        raise ConfigError(
            f"config key limits.max_concurrent_rpcs must be 0 or at least limits.max_workers "
            f"({limits.max_workers}), got {limits.max_concurrent_rpcs}"
        )
    if not limits.watch_max_s < limits.stream_timeout_s:
        raise ConfigError(
            f"config key limits.watch_max_s must be below limits.stream_timeout_s "
            f"({limits.stream_timeout_s}), got {limits.watch_max_s}"
        )


def _check_number(key: str, value: float) -> None:
    positive = key in _POSITIVE
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"config key {key} must be a finite number {bound}, got {value}")


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix or '<root>'} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config keys in {prefix or '<root>'}: {unknown} (known: {sorted(fields)})")
    kwargs: dict[str, Any] = {}
    nested = {
        "tls": TlsConfig,
        "limits": LimitsConfig,
        "keepalive": KeepaliveConfig,
        "operator": OperatorConfig,
    }
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if prefix == "" and name in nested:
            kwargs[name] = _build(nested[name], value, name)
        elif prefix == "" and name == "model_ids":
            kwargs[name] = _model_ids(value)
        elif prefix == "" and name == "artifacts":
            kwargs[name] = _artifacts(value)
        elif prefix == "" and name == "planners":
            kwargs[name] = _planners(value)
        elif prefix == "operator" and name == "public_keys":
            kwargs[name] = _operator_keys(value)
        else:
            default = fields[name].default
            if default is dataclasses.MISSING or default is None:
                kwargs[name] = value
                continue
            # bool is an int to Python, not to an operator: `max_workers = true` is a mistake.
            is_bool = isinstance(value, bool)
            if isinstance(default, float) and isinstance(value, int) and not is_bool:
                value = float(value)
            if not isinstance(value, type(default)) or (is_bool and not isinstance(default, bool)):
                raise ConfigError(
                    f"config key {key} must be {type(default).__name__}, got {type(value).__name__}"
                )
            if isinstance(value, int | float) and not is_bool:
                _check_number(key, value)
            kwargs[name] = value
    built = cls(**kwargs)
    if isinstance(built, LimitsConfig):
        _check_limits(built)
    return built
