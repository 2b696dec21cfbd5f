"""Build, start and stop the provider's gRPC server from a TOML config.

Transport security is configuration, not code: TLS from PEM files, mTLS when a client CA is given
(the per-RPC signatures authenticate clients either way; mTLS adds a channel-level gate). Health
checking and reflection are always on, so load balancers and grpcurl work without extra setup, and a
shutdown first marks the health service NOT_SERVING so balancers drain the instance before its
streams are cut.

The config's keys: :mod:`zkunlearn.provider.config`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.v1 import operator_pb2 as opb
from zkunlearn.v1 import provider_pb2 as pb

from .config import ConfigError, ProviderConfig, TlsConfig
from .operator import OperatorService
from .operator_servicer import OperatorServicer, add_operator_to_server
from .planning import DeletionPlanner, PlanError, load_planner
from .service import ProofVerifier, ProviderService
from .servicer import ProviderServicer, TolerantDecoding, add_to_server
from .state import ProviderState, open_state

__all__ = [
    "ConfigError",
    "ProviderConfig",
    "ProviderServer",
    "build_server",
    "build_service",
    "load_signer",
    "run_worker",
    "run_worker_command",
    "serve",
    "serve_command",
]

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Provider"].full_name


def load_planners(config: ProviderConfig) -> dict[str, DeletionPlanner]:
    """Each ``[planners.<model_id>]`` built now, so a broken one stops the start, not an operator's call."""
    try:
        return {model: load_planner(model, table) for model, table in config.planners.items()}
    except PlanError as exc:
        raise ConfigError(str(exc)) from exc


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
    planners: Mapping[str, DeletionPlanner] | None = None,
) -> ProviderService:
    """The provider's logic from its config; its verification workers start with it."""
    signer = signer or load_signer(config.key_file)
    verifier = verifier or load_verifier(config.verifier, config)
    opened = state is None
    state = state or open_state(config.state)
    try:
        shapes = {model: planner.layer_shapes() for model, planner in (planners or {}).items()}
        service_config = dataclasses.replace(config.service_config(), layer_shapes=shapes)
        return ProviderService(state, signer, verifier, service_config)
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
    planners: Mapping[str, DeletionPlanner] | None = None,
) -> ProviderServer:
    """Create and start the server (port 0 in ``listen`` picks a free port; see ``.port``).

    On failure nothing is left running: the service's workers are stopped and a state this call
    opened is closed (a ``state`` passed in stays the caller's).
    """
    creds = server_credentials(config.tls)  # before anything is opened: a missing file fails cleanly
    planners = load_planners(config) if planners is None else planners
    opened = state is None
    service = build_service(config, verifier=verifier, state=state, signer=signer, planners=planners)
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
        port, health_servicer = _serve_on(server, config, service, creds, planners)
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
    planners: Mapping[str, DeletionPlanner],
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
    operator_keys = [bytes.fromhex(key) for key in config.operator.public_keys]
    add_operator_to_server(OperatorServicer(OperatorService(service, operator_keys, planners)), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            opb.DESCRIPTOR.services_by_name["Operator"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
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


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_worker_command(config_path: Path | None, replica_id: str | None = None) -> int:
    """``zkunlearn provider worker``: verify from the shared database until stopped; 2 on a bad config
    (one ``error:`` line on stderr)."""
    _log_to_stderr()
    overrides = {"replica_id": replica_id} if replica_id else {}
    try:
        run_worker(ProviderConfig.load(config_path, overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def serve_command(config_path: Path | None, listen: str | None = None, port_file: Path | None = None) -> int:
    """``zkunlearn provider serve``: serve until SIGINT/SIGTERM, writing the bound port to ``port_file``
    (atomically) once serving; 2 on a bad config (one ``error:`` line on stderr)."""
    _log_to_stderr()
    overrides = {"listen": listen} if listen else {}

    def _ready(running: ProviderServer) -> None:
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(running.port))
            os.replace(tmp, port_file)

    try:
        # build_server (inside serve) checks what only it can: TLS files, the verifier, the port.
        serve(ProviderConfig.load(config_path, overrides), ready=_ready)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
