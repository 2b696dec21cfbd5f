"""Single-use, stateless challenge nonces and the rate limits on issuing them.

A nonce is ``expiry || random || HMAC(key, subject || expiry || random)`` with a key derived from the
provider's signing key, so every replica issues and accepts the same nonces and issuing one writes
nothing: only a use, inside a call signed by the subject's key, is recorded (and a replay refused).
Subjects are client ids, which cannot contain ``/``, or ``operator/<key id>``, so a nonce issued to one
namespace is never accepted in the other.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from zkunlearn.proofs.statements import StatementSigner

from .errors import RetryLaterError, UnauthenticatedError
from .models import ServiceConfig
from .ratelimit import RateLimiter
from .state import ConflictError, NonceError, ProviderState

__all__ = ["NonceBook"]

_NONCE_BYTES = 16
_NONCE_MAC_BYTES = 16
_PURGE_EVERY_MS = 60_000


class NonceBook:
    """Issues nonces, checks and records their single use, and throttles who asks for them."""

    def __init__(
        self,
        state: ProviderState,
        signer: StatementSigner,
        config: ServiceConfig,
        clock_ms: Callable[[], int],
    ) -> None:
        self.state, self.config, self.clock_ms = state, config, clock_ms
        # Only the provider's key holders (its replicas) can derive this key.
        self._key = hashlib.sha256(b"zkunlearn/nonce-key/v1" + signer.private_bytes()).digest()
        self._last_purge_ms = 0
        self._per_peer = RateLimiter(config.challenge_rate_per_peer)
        self._per_subject = RateLimiter(config.challenge_rate_per_subject)

    def throttle(self, subject: str, peer: str) -> None:
        """Refuse, as retryable, a caller (``peer``: its address) or a subject asking for nonces
        faster than ``challenge_rate_per_peer`` / ``challenge_rate_per_subject`` allow."""
        if peer and not self._per_peer.allow(peer):
            raise RetryLaterError("too many challenges from this address; retry after a short wait")
        if not self._per_subject.allow(subject):
            raise RetryLaterError("too many challenges for this id; retry after a short wait")

    def issue(self, subject: str) -> tuple[bytes, int]:
        """A nonce only ``subject`` can use, once, before the returned expiry (Unix ms)."""
        expires = self.clock_ms() + int(self.config.nonce_ttl_s * 1000)
        head = expires.to_bytes(8, "big") + secrets.token_bytes(_NONCE_BYTES)
        return head + self._mac(subject, head), expires

    def _mac(self, subject: str, head: bytes) -> bytes:
        message = len(subject).to_bytes(2, "big") + subject.encode() + head
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]

    def use(self, subject: str, nonce: bytes) -> None:
        """Refuse a nonce this provider did not issue to ``subject``, an expired one, or a replay;
        otherwise record its use."""
        now = self.clock_ms()
        head, mac = nonce[:-_NONCE_MAC_BYTES], nonce[-_NONCE_MAC_BYTES:]
        if len(nonce) != 8 + _NONCE_BYTES + _NONCE_MAC_BYTES or not hmac.compare_digest(
            mac, self._mac(subject, head)
        ):
            raise UnauthenticatedError(
                "unknown nonce (not issued to this client): ask Challenge for a fresh one"
            )
        expires = int.from_bytes(head[:8], "big")
        if expires < now:
            raise UnauthenticatedError("nonce expired: ask Challenge for a fresh one")
        if now - self._last_purge_ms > _PURGE_EVERY_MS:
            # Expired nonces are refused by their own expiry: the used ones only need keeping until then.
            self._last_purge_ms = now
            self.state.purge_nonces(now)
        try:
            self.state.add_nonce(subject, nonce, expires)
            self.state.consume_nonce(subject, nonce, now)
        except (ConflictError, NonceError) as exc:
            raise UnauthenticatedError(
                "nonce already used (replay refused): ask Challenge for a fresh one"
            ) from exc
