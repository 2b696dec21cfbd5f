"""What the provider refuses: one class per gRPC status the servicer maps it to.

Messages go to the caller verbatim, so each names what is wrong without echoing secrets.
"""

from __future__ import annotations

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


class ServiceError(Exception):
    """A refused call; subclasses name the status, the message names what was wrong."""


class InvalidInputError(ServiceError):
    pass


class UnauthenticatedError(ServiceError):
    pass


class PermissionDeniedError(ServiceError):
    pass


class NotFoundServiceError(ServiceError):
    pass


class AlreadyExistsError(ServiceError):
    pass


class FailedPreconditionError(ServiceError):
    pass


class ResourceExhaustedError(ServiceError):
    pass


class RetryLaterError(ServiceError):
    """Transient refusal (a rate limit): UNAVAILABLE, which clients retry with backoff."""
