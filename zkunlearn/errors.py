"""The root of every error zkunlearn raises, and the three meanings a caller can catch it by.

Every exception class of the product derives from :class:`ZkUnlearnError`; most also derive from one
of the three categories below, chosen by what a caller should do about it:

* :class:`MalformedError` -- the input does not parse or does not fit (shapes, formats, files,
  configuration). Retrying the same input fails the same way; fix the input.
* :class:`RefusedError` -- the input is well formed but refused: a signature or proof that does not
  verify, a replay, an expired request, a policy or permission. Retrying does not help either; it is
  the answer.
* :class:`TransientError` -- the operation may succeed if retried later (a rate limit, a network
  failure, a crashed verifier process, state that changed underneath).

Errors that fit none of these (a local environment problem such as a missing SRS or a failed ONNX
export) derive from the root only. Module-specific classes keep their builtin bases (``ValueError``,
``RuntimeError``) so existing ``except`` clauses still catch them. This module imports nothing from
the product, so every part may depend on it.
"""

from __future__ import annotations

__all__ = ["MalformedError", "RefusedError", "TransientError", "ZkUnlearnError"]


class ZkUnlearnError(Exception):
    """Base class of every error the product raises; the message names what went wrong."""


class MalformedError(ZkUnlearnError, ValueError):
    """The input does not parse or does not fit what it must fit; the message names the field."""


class RefusedError(ZkUnlearnError):
    """A well-formed input refused by verification or policy; retrying it gives the same answer."""


class TransientError(ZkUnlearnError):
    """A failure that may not recur: retry with backoff."""
