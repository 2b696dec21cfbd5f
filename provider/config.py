"""The provider's TOML configuration: pydantic models, one per section; a bad key is refused with one
message naming it.

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
    [policy]
    # Update kinds Enroll accepts. Default: the exact relations only. Adding "group_obs" or "analytic"
    # (fixed-point relations that do not certify the deletion) is for benchmarks and logs a warning.
    update_kinds = ["group_obs_exact", "analytic_exact"]
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from zkunlearn.proofs.statements import StatementError, StatementVerifier

from zkunlearn.errors import MalformedError

from .models import LOOSE_UPDATE_KINDS, SOUND_UPDATE_KINDS, UPDATE_KINDS, ServiceConfig
from .update_policy import KIND_NAMES, kind_label, kinds_from_names, loose_kind_problem

__all__ = [
    "ConfigError",
    "KeepaliveConfig",
    "LimitsConfig",
    "OperatorConfig",
    "PolicyConfig",
    "ProviderConfig",
    "TlsConfig",
]


class ConfigError(MalformedError):
    """The provider config is malformed or names files that cannot be used."""


Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    """Strict: a TOML value of the wrong type is refused (``true`` is no number), never coerced;
    unknown keys are refused; numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TlsConfig(_Section):
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # non-empty: require and verify client certificates (mTLS)


class LimitsConfig(_Section):
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    max_proof_bytes: PositiveInt = 256 * 1024 * 1024
    nonce_ttl_s: Positive = 120.0
    challenge_rate_per_peer: NonNegative = 200.0  # Challenge calls per second per address (0: no limit)
    challenge_rate_per_subject: NonNegative = 10.0  # per client id or operator key (0: no limit)
    request_ttl_s: Positive = 7 * 24 * 3600.0
    # Submissions verified at once, and the ezkl processes checking their proofs; 0: verify nothing
    # here (stand-alone `zkunlearn provider worker`s do).
    verify_workers: NonNegativeInt = 2
    verify_lease_s: Positive = 300.0
    verify_poll_s: Positive = 0.25
    verify_max_attempts: PositiveInt = 3
    max_submissions_per_request: PositiveInt = 16
    # Let a client re-enroll while a request addressed to it is open (docs/decisions/re-enrollment.md).
    reenroll_with_open_requests: bool = False
    max_workers: PositiveInt = 16  # RPC threads; each open WatchRequests or GetArtifact stream holds one
    # Calls admitted at once (running or queued for a thread); beyond it gRPC answers RESOURCE_EXHAUSTED
    # at once instead of queueing without bound. 0: 4 x max_workers.
    max_concurrent_rpcs: NonNegativeInt = 0
    # WatchRequests + GetArtifact + SubmitProof streams at once, below max_workers so unary calls find a
    # thread; excess streams get UNAVAILABLE (retried). 0: max_workers - max(2, max_workers // 4) (12 of 16).
    max_streams: NonNegativeInt = 0
    watch_max_s: Positive = 300.0  # a watch stream ends (status OK) after this; the SDK re-opens it
    stream_timeout_s: Positive = 1800.0  # a stream still open after this (a stalled reader) is cancelled

    def stream_slots(self) -> int:
        return self.max_streams or max(1, self.max_workers - max(2, self.max_workers // 4))

    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or 4 * self.max_workers

    @model_validator(mode="after")
    def _threads_left_for_unary_calls(self) -> LimitsConfig:
        """Cross-key checks: the stream cap must leave RPC threads to unary calls."""
        if self.max_workers < 2:
            raise ValueError("config key limits.max_workers must be at least 2 (streams and unary calls)")
        if not self.stream_slots() < self.max_workers:
            raise ValueError(
                f"config key limits.max_streams must be below limits.max_workers ({self.max_workers}), "
                f"got {self.stream_slots()}, so unary calls always find a thread"
            )
        if self.concurrent_rpcs() < self.max_workers:
            raise ValueError(
                f"config key limits.max_concurrent_rpcs must be 0 or at least limits.max_workers "
                f"({self.max_workers}), got {self.max_concurrent_rpcs}"
            )
        if not self.watch_max_s < self.stream_timeout_s:
            raise ValueError(
                f"config key limits.watch_max_s must be below limits.stream_timeout_s "
                f"({self.stream_timeout_s}), got {self.watch_max_s}"
            )
        return self


class KeepaliveConfig(_Section):
    time_ms: PositiveInt = 30_000
    timeout_ms: PositiveInt = 10_000
    min_ping_interval_ms: PositiveInt = 10_000


class OperatorConfig(_Section):
    """Who may issue deletion requests, and how the operator CLI reaches and trusts the provider."""

    # raw Ed25519 public keys, hex: the operator keys the server accepts
    public_keys: tuple[str, ...] = Field(default=(), strict=False)
    key_file: str = "operator.key"  # the CLI's private operator key (`zkunlearn provider operator-key`)
    target: str = ""  # host:port the CLI dials (default: the provider's listen address)
    ca_file: str = ""  # PEM roots the CLI trusts when the provider serves TLS (default: tls.cert_file)
    server_name: str = ""  # TLS name to expect, when it differs from the target's host
    cert_file: str = ""  # the CLI's client certificate, when the provider requires mTLS
    cert_key_file: str = ""

    @field_validator("public_keys", mode="before")
    @classmethod
    def _ed25519_keys(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key operator.public_keys must be a list, got {type(value).__name__}")
        for key in value:
            try:
                StatementVerifier.from_public_bytes(bytes.fromhex(key))
            except (TypeError, ValueError, StatementError):
                shown = str(key)[:80]
                raise ValueError(
                    f"config key operator.public_keys holds {shown!r}, not a 64-hex Ed25519 public key"
                ) from None
        return tuple(value)


class PolicyConfig(_Section):
    """What the provider accepts from clients: the update kinds Enroll takes, by name."""

    update_kinds: tuple[str, ...] = Field(
        default=tuple(UPDATE_KINDS[k] for k in sorted(SOUND_UPDATE_KINDS)), strict=False
    )

    @field_validator("update_kinds", mode="before")
    @classmethod
    def _kind_names(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                'config key policy.update_kinds must be a list of kind names such as ["group_obs_exact"], '
                f"got {type(value).__name__} {str(value)[:80]!r}"
            )
        if not value:
            raise ValueError("config key policy.update_kinds must name at least one update kind")
        kinds_from_names(value)
        return tuple(value)

    def kinds(self) -> frozenset[int]:
        return kinds_from_names(self.update_kinds)


class ProviderConfig(_Section):
    listen: str = "127.0.0.1:50551"
    # Names this replica's verification leases; keep it stable across restarts (default: host:listen).
    replica_id: str = ""
    state: str = "provider.db"
    key_file: str = "provider.key"
    verifier: str = ""
    model_ids: tuple[str, ...] = Field(default=(), strict=False)
    submit_wait_s: NonNegative = 30.0
    watch_poll_s: Positive = 0.5
    grace_s: NonNegative = 5.0
    srs_digest: str = ""
    srs_insecure: bool = True
    tls: TlsConfig = Field(default_factory=TlsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    keepalive: KeepaliveConfig = Field(default_factory=KeepaliveConfig)
    # [artifacts.<circuit_id>]: artifact name -> file path
    artifacts: dict[str, dict[str, Annotated[str, Field(min_length=1)]]] = Field(default_factory=dict)
    operator: OperatorConfig = Field(default_factory=OperatorConfig)
    # [planners.<model_id>]: factory = "package.module:callable" and its keyword arguments
    planners: dict[str, dict[str, Any]] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @field_validator("model_ids", mode="before")
    @classmethod
    def _list_of_strings(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                f'config key model_ids must be a list of strings such as ["mnist-vit"], '
                f"got {type(value).__name__} {str(value)[:80]!r}"
            )
        return tuple(value)

    @model_validator(mode="after")
    def _publishes_only_accepted_kinds(self) -> ProviderConfig:
        """A circuit of a loose kind (``[artifacts."<model>/group_obs"]``) is published only on the same
        opt-in as its enrollments: devices would otherwise derive a circuit Enroll then refuses."""
        accepted = self.policy.kinds()
        for circuit in self.artifacts:
            kind = KIND_NAMES.get(circuit.rpartition("/")[2])
            if "/" in circuit and kind in LOOSE_UPDATE_KINDS and kind not in accepted:
                raise ValueError(
                    f"config [artifacts.{circuit!r}] publishes a circuit of update kind {kind_label(kind)}, "
                    f"which policy.update_kinds does not accept: {loose_kind_problem(kind)}"
                )
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProviderConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_message(exc.errors()[0])) from None

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
            reenroll_with_open_requests=self.limits.reenroll_with_open_requests,
            replica_id=self.replica_id or _default_replica_id(self.listen),
            srs_digest=self.srs_digest,
            srs_insecure=self.srs_insecure,
            update_kinds=self.policy.kinds(),
        )


def _default_replica_id(listen: str) -> str:
    """Host plus listen address: stable across restarts, distinct for replicas sharing a host."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.:" else "-" for ch in f"{socket.gethostname()}:{listen}")
    return safe[:100]


_TYPE_NAMES = {
    "int_type": "int",
    "int_from_float": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _message(error: ErrorDetails) -> str:
    """One line naming the key: what it must be and what it got."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    kind, given = error["type"], error.get("input")
    if kind == "value_error":  # a validator's own message, which names its key
        return str(error.get("ctx", {}).get("error", error["msg"]))
    if kind == "extra_forbidden":
        section = ".".join(loc[:-1]) or "<root>"
        return f"unknown config keys in {section}: {loc[-1:]}"
    if kind in _TYPE_NAMES:
        if kind in ("model_type", "model_attributes_type"):
            return f"config section {key or '<root>'} must be a table, got {type(given).__name__}"
        return f"config key {key} must be {_TYPE_NAMES[kind]}, got {type(given).__name__}"
    if kind in ("greater_than", "greater_than_equal", "finite_number"):
        bound = {"greater_than": " > 0", "greater_than_equal": " >= 0"}.get(kind, "")
        return f"config key {key} must be a finite number{bound}, got {given}"
    if kind == "string_too_short":
        return f"config key {key} must be a file path (non-empty string)"
    return f"config key {key} must be valid: {error['msg']} (got {str(given)[:80]!r})"
