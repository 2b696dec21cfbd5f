"""Build, start and stop the provider's gRPC server from a TOML config.

Transport security is configuration, not code: TLS from PEM files, mTLS when a client CA is given
(the per-RPC signatures authenticate clients either way; mTLS adds a channel-level gate). Health
checking and reflection are always on, so load balancers and grpcurl work without extra setup, and a
shutdown first marks the health service NOT_SERVING so balancers drain the instance before its
streams are cut.

Example config (every key optional)::

    listen = "127.0.0.1:50551"
    state = "provider.db"               # SQLite path, "memory", or an SQLAlchemy URL
    key_file = "provider.key"           # provider signing key, created (0600) if missing
    verifier = "zkunlearn.proofs.verifier:make_verifier"   # factory(config) -> ProofVerifier
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
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.v1 import provider_pb2 as pb

from .service import ProofVerifier, ProviderService, ServiceConfig
from .servicer import ProviderServicer, TolerantDecoding, add_to_server
from .state import ProviderState, open_state

__all__ = [
    "ConfigError",
    "ProviderConfig",
    "ProviderServer",
    "build_server",
    "build_service",
    "load_signer",
    "main",
    "run_worker",
    "serve",
    "worker_main",
]

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Provider"].full_name


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
    nested = {"tls": TlsConfig, "limits": LimitsConfig, "keepalive": KeepaliveConfig}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if prefix == "" and name in nested:
            kwargs[name] = _build(nested[name], value, name)
        elif prefix == "" and name == "model_ids":
            kwargs[name] = _model_ids(value)
        elif prefix == "" and name == "artifacts":
            kwargs[name] = _artifacts(value)
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


def load_signer(path: str | Path) -> StatementSigner:
    """The provider's long-term signing key; created with mode 0600 on first start."""
    key_path = Path(path)
    if key_path.exists():
        return StatementSigner.load(key_path)
    signer = StatementSigner.generate()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    signer.save(key_path)
    return signer


def load_verifier(spec: str, config: ProviderConfig) -> ProofVerifier:
    """Import ``module:factory`` and call ``factory(config)``.

    There is no default: a provider that silently accepted proofs unverified would be worse than none.
    """
    if not spec or ":" not in spec:
        raise ConfigError("config key 'verifier' must be 'module:factory' naming a ProofVerifier factory")
    module_name, _, attr = spec.partition(":")
    try:
        factory: Callable[[ProviderConfig], ProofVerifier] = getattr(
            importlib.import_module(module_name), attr
        )
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load verifier {spec!r}: {exc}") from exc
    verifier = factory(config)
    if not isinstance(verifier, ProofVerifier):
        raise ConfigError(
            f"verifier factory {spec!r} returned {type(verifier).__name__}, which has no verify()"
        )
    return verifier


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    if not tls.cert_file and not tls.key_file:
        if tls.client_ca_file:
            raise ConfigError("tls.client_ca_file (mTLS) needs tls.cert_file and tls.key_file")
        return None
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("TLS needs both tls.cert_file and tls.key_file")
    pair = [(_read(tls.key_file, "TLS key"), _read(tls.cert_file, "TLS certificate"))]
    if tls.client_ca_file:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(tls.client_ca_file, "client CA"), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


class ProviderServer:
    """A started server plus what it owns; ``stop()`` is graceful and idempotent."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        service: ProviderService,
        health_servicer: health.HealthServicer,
        state: ProviderState,
        grace_s: float,
        handlers: futures.ThreadPoolExecutor | None = None,
        handler_prefix: str = "",
    ) -> None:
        self.server = server
        self.handlers, self.handler_prefix = handlers, handler_prefix
        self.port = port
        self.service = service
        self.health = health_servicer
        self.state = state
        self.grace_s = grace_s
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.stopped_cleanly = True

    def stop(self, grace_s: float | None = None) -> None:
        """Drain, cancel what is left after ``grace_s``, close the state. Every wait is bounded: a handler
        stuck past the grace (one that ignores cancellation) is reported, never waited for forever."""
        with self._lock:
            if self._stopped.is_set():
                return
            grace = self.grace_s if grace_s is None else grace_s
            # Drain first: balancers see NOT_SERVING while in-flight calls finish.
            self.health.enter_graceful_shutdown()
            self.service.close(wait=False)
            deadline = time.monotonic() + grace + STOP_MARGIN_S
            stopped = self.server.stop(grace).wait(timeout=grace + STOP_MARGIN_S)
            # gRPC reports itself stopped once it has cancelled the calls, but a handler that ignores
            # cancellation keeps its pool thread, and the interpreter joins those threads at exit.
            busy: list[threading.Thread] = []
            if self.handlers is not None:
                self.handlers.shutdown(wait=False, cancel_futures=True)  # idle pool threads exit now
                mine = f"{self.handler_prefix}_"
                busy = [t for t in threading.enumerate() if t.name.startswith(mine)]
            for thread in busy:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            stuck = [t.name for t in busy if t.is_alive()]
            if not stopped or stuck:
                self.stopped_cleanly = False
                log.warning(
                    "gRPC server still busy %.1f s after its %.1f s grace (%d handler thread(s)): "
                    "stopping without it",
                    STOP_MARGIN_S,
                    grace,
                    len(stuck),
                )
            self.state.close()
            self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


HANDLER_THREAD_PREFIX = "zkunlearn-rpc"
STOP_MARGIN_S = 5.0
"""How long past its grace a stopping server may take before the provider stops without it."""


def build_service(
    config: ProviderConfig,
    *,
    verifier: ProofVerifier | None = None,
    state: ProviderState | None = None,
    signer: StatementSigner | None = None,
) -> ProviderService:
    """The provider's logic from its config; its verification workers start with it."""
    signer = signer or load_signer(config.key_file)
    verifier = verifier or load_verifier(config.verifier, config)
    opened = state is None
    state = state or open_state(config.state)
    try:
        return ProviderService(state, signer, verifier, config.service_config())
    except BaseException:
        if opened:
            state.close()
        raise


def build_server(
    config: ProviderConfig,
    *,
    verifier: ProofVerifier | None = None,
    state: ProviderState | None = None,
    signer: StatementSigner | None = None,
) -> ProviderServer:
    """Create and start the server (port 0 in ``listen`` picks a free port; see ``.port``).

    On failure nothing is left running: the service's workers are stopped and a state this call
    opened is closed (a ``state`` passed in stays the caller's).
    """
    creds = server_credentials(config.tls)  # before anything is opened: a missing file fails cleanly
    opened = state is None
    service = build_service(config, verifier=verifier, state=state, signer=signer)
    limits, ka = config.limits, config.keepalive
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", ka.time_ms),
        ("grpc.keepalive_timeout_ms", ka.timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", ka.min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
    server: grpc.Server | None = None
    try:
        # One prefix per server: its stop joins its own handler threads, not another server's.
        prefix = f"{HANDLER_THREAD_PREFIX}-{secrets.token_hex(4)}"
        handlers = futures.ThreadPoolExecutor(max_workers=limits.max_workers, thread_name_prefix=prefix)
        # Beyond maximum_concurrent_rpcs gRPC answers RESOURCE_EXHAUSTED at once instead of queueing.
        server = grpc.server(
            handlers,
            options=options,
            maximum_concurrent_rpcs=limits.concurrent_rpcs(),
            interceptors=[TolerantDecoding()],
        )
        port, health_servicer = _serve_on(server, config, service, creds)
    except BaseException:
        if server is not None:
            server.stop(0)
        service.close(wait=True)
        if opened:
            service.state.close()
        raise
    return ProviderServer(
        server, port, service, health_servicer, service.state, config.grace_s, handlers, prefix
    )


def _serve_on(
    server: grpc.Server,
    config: ProviderConfig,
    service: ProviderService,
    creds: grpc.ServerCredentials | None,
) -> tuple[int, health.HealthServicer]:
    limits = config.limits
    artifacts = {cid: {name: Path(p) for name, p in arts.items()} for cid, arts in config.artifacts.items()}
    servicer = ProviderServicer(
        service,
        submit_wait_s=config.submit_wait_s,
        watch_poll_s=config.watch_poll_s,
        artifacts=artifacts,
        max_streams=limits.stream_slots(),
        watch_max_s=limits.watch_max_s,
        stream_timeout_s=limits.stream_timeout_s,
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        port = (
            server.add_secure_port(config.listen, creds) if creds else server.add_insecure_port(config.listen)
        )
    except RuntimeError as exc:  # grpcio raises on a bind failure (address in use, bad address)
        raise ConfigError(f"cannot listen on {config.listen}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {config.listen}")
    recovered = service.recover()
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "provider listening on port %d (%s), %d pending submissions re-queued", port, config.listen, recovered
    )
    return port, health_servicer


def serve(config: ProviderConfig, *, ready: Callable[[ProviderServer], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully. ``zkunlearn provider serve`` calls this."""
    running = build_server(config)
    if ready is not None:
        ready(running)
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            threading.Thread(target=running.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    running.wait()
    if not running.stopped_cleanly:
        # A handler thread that ignores cancellation would otherwise hold the interpreter's exit
        # (it joins the server's worker threads) for ever. The state is closed: nothing is lost.
        logging.shutdown()
        os._exit(0)


def run_worker(config: ProviderConfig, *, stop: threading.Event | None = None) -> int:
    """A verification-only process: claims jobs from the shared state until SIGINT/SIGTERM.

    It serves no RPCs. Start as many as the verification load needs, on any machine that reaches
    the database and holds the provider's key, verifier and artifacts; replicas may then run with
    ``limits.verify_workers = 0`` and only take uploads. Returns the number of jobs it processed.
    """
    if config.limits.verify_workers < 1:
        raise ConfigError("a verification worker needs limits.verify_workers >= 1")
    service = build_service(config)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    threads = config.limits.verify_workers
    log.info("verification worker %s started (%d threads)", service.workers.replica_id, threads)
    service.recover()
    stop.wait()
    service.close(wait=True)
    service.state.close()
    return service.workers.processed


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``zkunlearn provider worker --config provider.toml``."""
    parser = argparse.ArgumentParser(description="zkunlearn verification worker")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--replica-id", default=None)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"replica_id": options.replica_id} if options.replica_id else {}
    try:
        config = ProviderConfig.load(options.config, overrides)
        run_worker(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zkunlearn.provider.server --config provider.toml [--set key=value ...]``."""
    parser = argparse.ArgumentParser(description="zkunlearn provider gRPC server")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--listen", default=None)
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"listen": options.listen} if options.listen else {}

    def _ready(running: ProviderServer) -> None:
        if options.port_file is not None:
            tmp = options.port_file.with_suffix(".tmp")
            tmp.write_text(str(running.port))
            os.replace(tmp, options.port_file)

    try:
        # build_server (inside serve) checks what only it can: TLS files, the verifier, the port.
        serve(ProviderConfig.load(options.config, overrides), ready=_ready)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
