"""The client's gRPC channel: TLS/mTLS, message limits, keepalive, and retries with backoff.

Only UNAVAILABLE and DEADLINE_EXCEEDED are retried: they are what a restarting or overloaded provider
answers, and every call the SDK makes is safe to repeat (reads, enrollment and submissions are
idempotent on the provider; authenticated calls fetch a fresh nonce on every attempt). Everything
else (a refused signature, a bad input) is final and surfaces at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

from zkunlearn.errors import TransientError

__all__ = ["RETRYABLE", "ChannelConfig", "Transport", "TransportError", "is_retryable"]

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class TransportError(TransientError, RuntimeError):
    """A channel could not be configured (missing or unreadable TLS files)."""


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE


@dataclass(frozen=True)
class ChannelConfig:
    target: str
    root_certs_file: str = ""  # non-empty: TLS, trusting these CAs
    client_cert_file: str = ""  # with client_key_file: mTLS
    client_key_file: str = ""
    server_name_override: str = ""  # for test certificates issued to another name
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    call_timeout_s: float = 30.0
    retry_attempts: int = 8
    retry_initial_s: float = 0.1
    retry_max_s: float = 2.0
    retry_budget_s: float = 60.0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportError(f"cannot read {what} {path}: {exc}") from exc


def open_channel(config: ChannelConfig) -> grpc.Channel:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        # Reconnect quickly after a provider restart instead of gRPC's default multi-second backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if not config.root_certs_file:
        if config.client_cert_file or config.client_key_file:
            raise TransportError("a client certificate (mTLS) needs root_certs_file too")
        if config.server_name_override:
            # A TLS option: without root certificates the channel would silently be plaintext.
            raise TransportError("server_name_override is a TLS option; it needs root_certs_file too")
        return grpc.insecure_channel(config.target, options=options)
    if bool(config.client_cert_file) != bool(config.client_key_file):
        raise TransportError("mTLS needs both client_cert_file and client_key_file")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(config.root_certs_file, "root certificates"),
        private_key=_read(config.client_key_file, "client key") if config.client_key_file else None,
        certificate_chain=_read(config.client_cert_file, "client certificate")
        if config.client_cert_file
        else None,
    )
    if config.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    return grpc.secure_channel(config.target, creds, options=options)


class Transport:
    """One channel and its stub; :meth:`call` runs a whole attempt (challenge + call) under retries."""

    def __init__(
        self, config: ChannelConfig | str, interceptors: Sequence[grpc.ClientInterceptor] = ()
    ) -> None:
        """``interceptors`` wrap every call (metrics, tracing); the load benchmark times RPCs with one."""
        self.config = ChannelConfig(config) if isinstance(config, str) else config
        self._raw_channel = open_channel(self.config)
        self.channel = (
            grpc.intercept_channel(self._raw_channel, *interceptors) if interceptors else self._raw_channel
        )
        self.stub = pb_grpc.ProviderStub(self.channel)

    def call(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, fails for a non-retryable reason, or the budget runs out."""
        c = self.config
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_exponential(multiplier=c.retry_initial_s, max=c.retry_max_s),
            stop=stop_after_attempt(c.retry_attempts) | stop_after_delay(c.retry_budget_s),
            reraise=True,
        )
        return retrying(attempt)

    @property
    def timeout(self) -> float:
        return self.config.call_timeout_s

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
