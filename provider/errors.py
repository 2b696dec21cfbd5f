"""What the provider refuses: one class per gRPC status the servicer maps it to.

Messages go to the caller verbatim, so each names what is wrong without echoing secrets.
"""

from __future__ import annotations

from zkunlearn.errors import MalformedError, RefusedError, TransientError, ZkUnlearnError

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidInputError",
    "NotFoundServiceError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryLaterError",
    "ServiceError",
    "UnauthenticatedError",
]


class ServiceError(ZkUnlearnError):
    """A refused call; subclasses name the status, the message names what was wrong."""


class InvalidInputError(ServiceError, MalformedError):
    pass


class UnauthenticatedError(ServiceError, RefusedError):
    pass


class PermissionDeniedError(ServiceError, RefusedError):
    pass


class NotFoundServiceError(ServiceError, RefusedError):
    pass


class AlreadyExistsError(ServiceError, RefusedError):
    pass


class FailedPreconditionError(ServiceError, RefusedError):
    pass


class ResourceExhaustedError(ServiceError, RefusedError):
    pass


class RetryLaterError(ServiceError, TransientError):
    """Transient refusal (a rate limit): UNAVAILABLE, which clients retry with backoff."""
