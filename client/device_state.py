"""The one-call device's state folder and what it is bound to.

``device.json`` names the provider key, model, client id and circuit kind the folder belongs to. It is
written once, after the published circuit is derived and before anything is enrolled, and checked on
every connect: a folder is reopened only for the same provider and model, never enrolled over, and a
folder holding client state without it (a low-level client's) is refused rather than overwritten.

Layout: ``device.json``; ``client.db`` (:class:`~zkunlearn.client.store.ClientStore`: keys, cursor,
receipts); ``committed/`` (the prover's committed state); ``published/<kind>`` and ``circuit/<kind>``
(:mod:`zkunlearn.client.published`).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from zkunlearn.errors import ZkUnlearnError

__all__ = ["MANIFEST", "DeviceError", "DeviceManifest", "parse_provider_key", "refuse_foreign_state"]

MANIFEST = "device.json"
FORMAT = "zkunlearn-device/v1"


class DeviceError(ZkUnlearnError, RuntimeError):
    """What the one-call device cannot do, with the reason: a wrong key pin, an unknown model, missing
    or refused circuit artifacts, a state folder of another model or provider, a refused enrollment."""


def parse_provider_key(key: bytes | str) -> bytes:
    """The provider's Ed25519 public key from 32 raw bytes or 64 hex digits."""
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key.strip())
        except ValueError:
            raise DeviceError("provider_key must be the provider's public key as 64 hex digits") from None
    if len(key) != 32:
        raise DeviceError(f"provider_key must be a 32-byte Ed25519 public key, got {len(key)} bytes")
    return bytes(key)


@dataclass(frozen=True)
class DeviceManifest:
    model_id: str
    client_id: str
    provider_public_key: str  # hex
    kind: str

    @staticmethod
    def new_client_id() -> str:
        return f"device-{secrets.token_hex(6)}"

    @classmethod
    def load(cls, folder: Path) -> DeviceManifest | None:
        """The folder's manifest, None when there is none; refused by name when it is not one."""
        path = Path(folder) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.pop("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            return cls(**{k: str(data[k]) for k in ("model_id", "client_id", "provider_public_key", "kind")})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"{path} is not a device manifest ({exc}); restore it or use another folder"
            raise DeviceError(reason) from exc

    def save(self, folder: Path) -> None:
        """Written atomically: a crash leaves the folder without a manifest or with this one."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, folder / MANIFEST)

    def check(self, folder: Path, model_id: str, provider_key: bytes, client_id: str | None) -> None:
        """Refuse to reopen the folder for another model, provider or client id than its own."""
        where = f"state folder {folder} belongs to"
        if self.provider_public_key != provider_key.hex():
            raise DeviceError(
                f"{where} the provider with key {self.provider_public_key}, not {provider_key.hex()}; "
                "use another folder for another provider"
            )
        if self.model_id != model_id:
            raise DeviceError(f"{where} model {self.model_id!r}, not {model_id!r}; use another folder")
        if client_id is not None and client_id != self.client_id:
            raise DeviceError(f"{where} client {self.client_id!r}, not {client_id!r}")


def refuse_foreign_state(folder: Path) -> None:
    """A folder without a manifest may hold a partial download, never a client's keys or committed state."""
    held = [name for name in ("client.db", "committed") if (Path(folder) / name).exists()]
    if held:
        raise DeviceError(
            f"state folder {folder} holds client state ({', '.join(held)}) but no {MANIFEST}; "
            "refusing to overwrite it: use another folder"
        )
