"""One error root: every exception class the product defines derives from ``ZkUnlearnError``, and the
three meanings (malformed / refused / transient) are what the classes that raise them say."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from zkunlearn.errors import MalformedError, RefusedError, TransientError, ZkUnlearnError

PACKAGES = (
    "zkunlearn.circuits", "zkunlearn.proofs", "zkunlearn.provider", "zkunlearn.client", "zkunlearn.tasks",
)  # fmt: skip


def _product_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if ".migrations" in info.name:  # alembic scripts run only inside alembic
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                    and not name.startswith("_")
                ):
                    found[f"{module.__name__}.{name}"] = value
    return found


def test_every_product_exception_derives_from_the_root() -> None:
    found = _product_exceptions()
    assert len(found) > 40, sorted(found)  # the walk reached every part
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, ZkUnlearnError))
    assert outside == []


def test_one_class_per_exception_name() -> None:
    by_name: dict[str, list[str]] = {}
    for qualified in _product_exceptions():
        by_name.setdefault(qualified.rsplit(".", 1)[-1], []).append(qualified)
    assert {name: where for name, where in by_name.items() if len(where) > 1} == {}


@pytest.mark.parametrize(
    ("qualified", "meaning"),
    [
        ("zkunlearn.proofs.layout.DeletionError", MalformedError),
        ("zkunlearn.proofs.backend.ProofFormatError", MalformedError),
        ("zkunlearn.provider.config.ConfigError", MalformedError),
        ("zkunlearn.provider.errors.InvalidInputError", MalformedError),
        ("zkunlearn.circuits.mask.MaskError", MalformedError),
        ("zkunlearn.client.records.ForgedRequestError", RefusedError),
        ("zkunlearn.client.records.ReceiptError", RefusedError),
        ("zkunlearn.proofs.transparency.MerkleProofError", RefusedError),
        ("zkunlearn.provider.errors.UnauthenticatedError", RefusedError),
        ("zkunlearn.provider.state._base.NonceError", RefusedError),
        ("zkunlearn.provider.errors.RetryLaterError", TransientError),
        ("zkunlearn.proofs.verify_pool.VerifierCrashedError", TransientError),
        ("zkunlearn.client.transport.TransportError", TransientError),
        ("zkunlearn.provider.state._base.StaleCommitmentsError", TransientError),
    ],
)
def test_a_caller_can_catch_by_meaning(qualified: str, meaning: type[ZkUnlearnError]) -> None:
    cls = _product_exceptions()[qualified]
    assert issubclass(cls, meaning)
    others = {MalformedError, RefusedError, TransientError} - {meaning}
    assert not any(issubclass(cls, other) for other in others), f"{qualified} has two meanings"


def test_malformed_input_is_still_a_value_error() -> None:
    """Categories keep the builtin bases callers already catch."""
    from zkunlearn.circuits.mask import MaskError

    assert issubclass(MalformedError, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise MaskError("bad")
