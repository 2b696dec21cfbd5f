"""The proving backend: one protocol, one ezkl/Halo2 implementation.

Why a protocol: sumcheck/GKR provers are 17-150x faster on matrix work than Halo2; keeping the
pipeline (settings, compile, setup, witness, prove, verify, commit) behind :class:`ProvingBackend`
lets one be added without touching the verifier's binding logic.

Settings are always written with EXPLICIT visibilities (ezkl's Python default input visibility is
``public``, which would publish the weights): committed inputs are ``polycommit``, the residual
maxima are ``public``, constants are ``fixed``.

Cost work (Group-OBS check, B=16, m=8, 2 blocks per proof; ``num_rows`` from the compiled settings,
times on the shared 2-core machine):

===========================================  ======  ========  =====================
configuration                                rows    logrows   setup / prove
===========================================  ======  ========  =====================
scale 13, decomp 16384x2, gen_settings'       10207   17        ~180 s / --  (pk 1.36 GB;
default logrows (lookup_range +-32768)                          the default range sets k)
same, logrows set from rows (15)             10207   15        44 s / 40 s (loaded machine)
ignore_range_check_inputs_outputs            8203    15        (not used: see below)
input scale 10 instead of 13                 10207   15        no change: rows do not depend on scale
num_inner_cols 1 / 4                         20414 / 5781      more columns cost as much as rows
decomp base 1024 x 3 legs                    12907   14        range table 1024 rows lets k drop to 14
scale_rebase_multiplier 2 (fewer rescales)   7647    15        outputs at scale 26
**decomp 1024x3 + rebase 2 (default here)**  9675    14        5.5 s / 6.5 s, RSS 0.74 GB
===========================================  ======  ========  =====================

So at small shapes the floor is the range-check table (2**14 rows at base 16384), not the relation:
a smaller decomposition base plus fewer rescales moved the same relation from k=15 to k=14 (about 4x
less setup and prove). ``ignore_range_check_inputs_outputs`` would cut 20 % of rows, but nothing else
bounds the committed inputs (their commitments come from enrollment, with no range proof), so it stays
off; the out-of-range attack test runs against this configuration.

Fusing residuals: the ``form="dual"`` Group-OBS relation (``r_w = m lam w + G delta``, m-sized, in
place of the B-sized stationarity residual; see :mod:`zkunlearn.circuits.group_obs`) cuts rows by
~30 % (B=16, m=8, 2 blocks: 6339 rows, k=13; B=64, m=16: 32339 vs 46947, k=15 vs 16) and tightens
the derived tolerance ~7x (0.039 vs 0.28 at B=32, m=8).

Measured by ``bench/proofs.py`` (one proof, 2 blocks per Group-OBS proof; machine shared, load 4-5 on
2 cores, so times are ~3-4x those of an idle machine, where k=14 took 5.5 s setup / 6.5 s prove):

=====================  =======  ======  =======  =======  ========  =======  =====
relation, shape         k       rows    setup s  prove s  verify s  RSS MB   proof
=====================  =======  ======  =======  =======  ========  =======  =====
Group-OBS B16 m8 x2     14      9675    55       25       0.12      451      4832 B
Group-OBS B32 m16 x2    15      23715   69       32       0.22      862      4832 B
analytic d8 k3 n_u4     14      9135    20       22       0.08      631      7424 B
=====================  =======  ======  =======  =======  ========  =======  =====

Rows per covered weight: ~300 (B=16) to ~370 (B=32), about 1.45x the prototype's
``6.4 m B + 155 B`` because of the extra ``r_row`` products and mask multiplications.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ezkl as _ezkl
from zkunlearn.proofs.commit_memo import CommitmentMemo, commitment_key
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS

from zkunlearn.errors import MalformedError, ZkUnlearnError

# ezkl's bundled stubs lag its runtime (PyRunArgs fields, optional arguments): use it untyped.
ezkl: Any = _ezkl

EZKL_VERSION = "23.0.5"
_HEX_BYTES = re.compile(r"(?:[0-9a-fA-F]{2})*")
_FELT = re.compile(r"[0-9a-fA-F]{64}")

PROOF_MAGIC = b"zkp\x01"
"""First bytes of a binary proof (:meth:`Proof.to_bytes`): format name and version 1."""
MAX_TRANSCRIPT_BYTES = 1 << 24
"""A Halo2 transcript of any circuit this product publishes is a few KB; larger claims are refused
before anything is allocated."""


class BackendError(ZkUnlearnError, RuntimeError):
    """A step of the proving pipeline failed."""


class ProvingError(BackendError):
    """Witness generation or proving failed (e.g. an input outside the circuit's range checks)."""


class ProofFormatError(BackendError, MalformedError):
    """A serialised proof is malformed."""


@dataclass(frozen=True)
class CircuitConfig:
    """Knobs that change the compiled circuit (and therefore its vk and every commitment)."""

    input_scale: int = 13
    scale_rebase_multiplier: int = 2
    decomp_base: int = 1024
    decomp_legs: int = 3
    num_inner_cols: int = 2
    ignore_range_check_io: bool = False
    max_logrows: int = 17
    row_reserve: int = 64
    # A floor on logrows. A polycommit commitment depends on the circuit's domain size, so two circuits
    # that must accept each other's commitments (Group-OBS's theta' in the output refit) need the same
    # logrows (and SRS): build both with the larger one as the floor.
    min_logrows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Proof:
    """A proof as it travels: raw transcript bytes plus the public instances (felts)."""

    transcript: bytes
    instances: tuple[tuple[str, ...], ...]

    def digest(self) -> str:
        """Replay key: SHA-256 over the transcript and instances."""
        h = hashlib.sha256(b"zkunlearn/proof/v1")
        h.update(len(self.transcript).to_bytes(8, "big"))
        h.update(self.transcript)
        for row in self.instances:
            h.update(b"|" + ",".join(row).encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"transcript": self.transcript.hex(), "instances": [list(r) for r in self.instances]}

    @classmethod
    def from_json(cls, obj: Any) -> Proof:
        """Parse untrusted proof JSON; anything but ``{transcript: hex, instances: [[felt hex]]}`` is a
        :class:`ProofFormatError` (a wrong type must not be coerced into a plausible-looking proof)."""
        if not isinstance(obj, dict):
            raise ProofFormatError(
                f"malformed proof object: expected a JSON object, got {type(obj).__name__}"
            )
        for key in ("transcript", "instances"):
            if key not in obj:
                raise ProofFormatError(f"malformed proof object: field {key!r} is missing")
        raw = obj["transcript"]
        if not isinstance(raw, str) or not _HEX_BYTES.fullmatch(raw):
            raise ProofFormatError("malformed proof object: transcript must be a string of hex byte pairs")
        rows = obj["instances"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise ProofFormatError("malformed proof object: instances must be a list of lists of felts")
        for i, row in enumerate(rows):
            for j, felt in enumerate(row):
                if not isinstance(felt, str) or not _FELT.fullmatch(felt):
                    raise ProofFormatError(
                        f"malformed proof object: instances[{i}][{j}] is not a felt (64 hex digits)"
                    )
        return cls(transcript=bytes.fromhex(raw), instances=tuple(tuple(row) for row in rows))

    def to_bytes(self) -> bytes:
        """The wire form (``docs/wire.md`` "Proofs"): ``PROOF_MAGIC``, the transcript as u32 length +
        bytes, then u16 columns, each u32 count + 32-byte felts (ezkl's little-endian encoding); all
        integers big-endian. One proof has exactly one encoding."""
        out = bytearray(PROOF_MAGIC)
        out += len(self.transcript).to_bytes(4, "big") + self.transcript
        out += len(self.instances).to_bytes(2, "big")
        for row in self.instances:
            out += len(row).to_bytes(4, "big")
            for felt in row:
                out += bytes.fromhex(felt)
        return bytes(out)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Proof:
        """Parse untrusted wire bytes; anything but :meth:`to_bytes`'s output of a proof with a non-empty
        transcript and reduced felts is a :class:`ProofFormatError` naming what is wrong."""
        view = memoryview(raw)
        if bytes(view[: len(PROOF_MAGIC)]) != PROOF_MAGIC:
            raise ProofFormatError("not a zkunlearn binary proof (wrong magic bytes or version)")
        at = len(PROOF_MAGIC)

        def take(n: int, what: str) -> bytes:
            nonlocal at
            if n > len(view) - at:
                raise ProofFormatError(f"truncated: {what} needs {n} bytes, {len(view) - at} remain")
            chunk = bytes(view[at : at + n])
            at += n
            return chunk

        size = int.from_bytes(take(4, "the transcript length"), "big")
        if not 0 < size <= MAX_TRANSCRIPT_BYTES:
            raise ProofFormatError(f"transcript length {size} outside 1..{MAX_TRANSCRIPT_BYTES}")
        transcript = take(size, "the transcript")
        rows: list[tuple[str, ...]] = []
        for i in range(int.from_bytes(take(2, "the column count"), "big")):
            count = int.from_bytes(take(4, f"column {i}'s length"), "big")
            block = take(32 * count, f"column {i}'s {count} felts")
            row = []
            for j in range(count):
                felt = block[32 * j : 32 * j + 32]
                if int.from_bytes(felt, "little") >= FIELD_MODULUS:
                    raise ProofFormatError(f"instances[{i}][{j}] is not reduced modulo the field order")
                row.append(felt.hex())
            rows.append(tuple(row))
        if at != len(view):
            raise ProofFormatError(f"{len(view) - at} trailing bytes after the proof")
        return cls(transcript=transcript, instances=tuple(rows))

    def write_ezkl(self, path: Path) -> None:
        """The proof.json that ezkl's verify/swap read, rebuilt from the raw bytes."""
        Path(path).write_text(
            json.dumps(
                {
                    "protocol": None,
                    "instances": [list(r) for r in self.instances],
                    "proof": list(self.transcript),
                    "hex_proof": "0x" + self.transcript.hex(),
                    "split": None,
                    "pretty_public_inputs": None,
                    "timestamp": None,
                    "version": EZKL_VERSION,
                }
            )
        )


def compress_point(x_hex: str, y_hex: str) -> str:
    """ezkl's compressed G1 encoding: x little-endian, bit 7 of the last byte = y is odd."""
    b = bytearray(bytes.fromhex(x_hex))
    if bytes.fromhex(y_hex)[0] & 1:
        b[-1] |= 0x80
    return b.hex()


BN254_BASE_FIELD = 21888242871839275222246405745257275088696311157297823662689037894645226208583


def transcript_point(compressed_hex: str) -> bytes:
    """The 64-byte form (x then y, big-endian) in which a Halo2 transcript carries a G1 point.

    ezkl's witness stores commitments compressed (x little-endian, y-parity in bit 7 of the last
    byte); the transcript starts with the committed-input points uncompressed. Decompressing lets
    the verifier compare every byte, not only what a swap would overwrite.
    """
    b = bytearray(bytes.fromhex(compressed_hex))
    if len(b) != 32:
        raise ProofFormatError(f"compressed point must be 32 bytes, got {len(b)}")
    odd = bool(b[-1] & 0x80)
    b[-1] &= 0x7F
    x = int.from_bytes(b, "little")
    q = BN254_BASE_FIELD
    if x >= q:
        raise ProofFormatError("point x-coordinate is not a field element")
    rhs = (pow(x, 3, q) + 3) % q
    y = pow(rhs, (q + 1) // 4, q)
    if y * y % q != rhs:
        raise ProofFormatError("compressed point is not on the BN254 curve")
    if (y & 1) != odd:
        y = q - y
    return x.to_bytes(32, "big") + y.to_bytes(32, "big")


def is_commitment_point(compressed_hex: str) -> bool:
    """Whether ``compressed_hex`` is a commitment ezkl can carry: 32 bytes encoding a point of BN254's
    G1 (cofactor 1: every point on the curve is in the group)."""
    try:
        transcript_point(compressed_hex)
    except (ProofFormatError, ValueError):
        return False
    return True


def point_from_tag(tag: bytes) -> str:
    """A valid compressed G1 point derived from ``tag`` by try-and-increment: no one knows the tensor
    it would commit to. For synthetic loads and tests that need well-formed commitments."""
    counter = 0
    while True:
        digest = hashlib.sha256(tag + counter.to_bytes(4, "big")).digest()
        x = int.from_bytes(digest, "big") % BN254_BASE_FIELD
        rhs = (pow(x, 3, BN254_BASE_FIELD) + 3) % BN254_BASE_FIELD
        y = pow(rhs, (BN254_BASE_FIELD + 1) // 4, BN254_BASE_FIELD)
        if y * y % BN254_BASE_FIELD == rhs:
            return compress_point(x.to_bytes(32, "little").hex(), y.to_bytes(32, "little").hex())
        counter += 1


class ProvingBackend(Protocol):
    name: str

    @property
    def concurrency(self) -> int: ...

    def make_settings(
        self, onnx_path: Path, settings_path: Path, config: CircuitConfig
    ) -> dict[str, Any]: ...

    def compile(self, onnx_path: Path, settings_path: Path, compiled_path: Path) -> None: ...

    def setup(self, compiled_path: Path, srs_path: Path, vk_path: Path, pk_path: Path) -> None: ...

    def witness(
        self, inputs: Sequence[Sequence[float | str]], compiled_path: Path, vk_path: Path, srs_path: Path
    ) -> dict[str, Any]: ...

    def prove(self, witness: dict[str, Any], compiled_path: Path, pk_path: Path, srs_path: Path) -> Proof: ...

    def verify(
        self,
        proof: Proof,
        settings_path: Path,
        vk_path: Path,
        srs_path: Path,
        expected_commitments: Sequence[str] | None,
    ) -> bool: ...

    def commit(self, felts: Sequence[str], vk_path: Path, settings_path: Path, srs_path: Path) -> str: ...


class EzklBackend:
    """ezkl 23 (Halo2 + KZG) implementation of :class:`ProvingBackend`.

    With a ``commit_memo``, :meth:`commit` returns a commitment already computed for the same key files
    and field elements instead of computing it again (:mod:`zkunlearn.proofs.commit_memo`).
    """

    name = "ezkl"

    def __init__(self, *, commit_memo: CommitmentMemo | None = None) -> None:
        self.commit_memo = commit_memo

    @property
    def concurrency(self) -> int:
        """How many ``verify``/``commit`` calls this backend runs at once from separate threads."""
        return 1

    def make_settings(self, onnx_path: Path, settings_path: Path, config: CircuitConfig) -> dict[str, Any]:
        """Settings with explicit visibilities and the smallest logrows that fits rows + range table."""
        ra = ezkl.PyRunArgs()
        ra.input_visibility = "polycommit"
        ra.output_visibility = "public"
        ra.param_visibility = "fixed"
        ra.input_scale = config.input_scale
        ra.param_scale = config.input_scale
        ra.scale_rebase_multiplier = config.scale_rebase_multiplier
        ra.decomp_base = config.decomp_base
        ra.decomp_legs = config.decomp_legs
        ra.num_inner_cols = config.num_inner_cols
        ra.ignore_range_check_inputs_outputs = config.ignore_range_check_io
        ra.lookup_range = (-2, 2)
        ra.logrows = config.max_logrows
        self._gen_settings(onnx_path, settings_path, ra)
        first = json.loads(Path(settings_path).read_text())
        if first.get("required_lookups"):
            raise BackendError(
                f"{onnx_path}: circuit needs lookups {first['required_lookups']}; "
                "the check relations are designed to need range checks only"
            )
        table = max((hi - lo + 1 for lo, hi in first.get("required_range_checks", [])), default=0)
        needed = max(int(first["num_rows"]), table) + config.row_reserve
        logrows = max(math.ceil(math.log2(needed)), 10, config.min_logrows)
        if logrows > config.max_logrows:
            raise BackendError(f"{onnx_path}: needs logrows {logrows} > max {config.max_logrows}")
        ra.logrows = logrows
        self._gen_settings(onnx_path, settings_path, ra)
        settings: dict[str, Any] = json.loads(Path(settings_path).read_text())
        if settings["run_args"]["input_visibility"] != "KZGCommit":
            raise BackendError(
                "input visibility did not stick: refusing to build a circuit with public weights"
            )
        return settings

    @staticmethod
    def _gen_settings(onnx_path: Path, settings_path: Path, ra: Any) -> None:
        if not ezkl.gen_settings(str(onnx_path), str(settings_path), py_run_args=ra):
            raise BackendError(f"gen_settings failed for {onnx_path}")

    def compile(self, onnx_path: Path, settings_path: Path, compiled_path: Path) -> None:
        if not ezkl.compile_circuit(str(onnx_path), str(compiled_path), str(settings_path)):
            raise BackendError(f"compile_circuit failed for {onnx_path}")

    def setup(self, compiled_path: Path, srs_path: Path, vk_path: Path, pk_path: Path) -> None:
        if not ezkl.setup(str(compiled_path), str(vk_path), str(pk_path), srs_path=str(srs_path)):
            raise BackendError("setup failed")

    def witness(
        self, inputs: Sequence[Sequence[float | str]], compiled_path: Path, vk_path: Path, srs_path: Path
    ) -> dict[str, Any]:
        """Witness for flattened inputs; an entry may be a float or a raw felt (hex string)."""
        with tempfile.TemporaryDirectory(prefix="zkw-") as tmp:
            data = Path(tmp) / "input.json"
            out = Path(tmp) / "witness.json"
            data.write_text(json.dumps({"input_data": [list(x) for x in inputs]}))
            try:
                ezkl.gen_witness(
                    str(data), str(compiled_path), str(out), vk_path=str(vk_path), srs_path=str(srs_path)
                )
            except BaseException as exc:  # pyo3 panics derive from BaseException
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise ProvingError(f"witness generation failed: {exc}") from exc
            result: dict[str, Any] = json.loads(out.read_text())
            return result

    def prove(self, witness: dict[str, Any], compiled_path: Path, pk_path: Path, srs_path: Path) -> Proof:
        with tempfile.TemporaryDirectory(prefix="zkp-") as tmp:
            wpath = Path(tmp) / "witness.json"
            ppath = Path(tmp) / "proof.json"
            wpath.write_text(json.dumps(witness))
            try:
                ezkl.prove(str(wpath), str(compiled_path), str(pk_path), str(ppath), srs_path=str(srs_path))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise ProvingError(f"proving failed: {exc}") from exc
            obj = json.loads(ppath.read_text())
        return Proof(
            transcript=bytes(obj["proof"]),
            instances=tuple(tuple(str(x) for x in row) for row in obj["instances"]),
        )

    def verify(
        self,
        proof: Proof,
        settings_path: Path,
        vk_path: Path,
        srs_path: Path,
        expected_commitments: Sequence[str] | None,
    ) -> bool:
        """Verify; with ``expected_commitments`` the proof's input commitments are replaced first.

        Swapping replaces the committed-input points in the transcript by the ones the verifier
        expects, so a proof made over other data no longer satisfies the constraint system.
        """
        with tempfile.TemporaryDirectory(prefix="zkv-") as tmp:
            ppath = Path(tmp) / "proof.json"
            proof.write_ezkl(ppath)
            try:
                if expected_commitments is not None:
                    # Byte-exact check first: a swap alone would silently repair a tampered point.
                    for i, com in enumerate(expected_commitments):
                        if proof.transcript[64 * i : 64 * i + 64] != transcript_point(com):
                            return False
                    wpath = Path(tmp) / "expected.json"
                    wpath.write_text(json.dumps(self._commitment_witness(expected_commitments)))
                    ezkl.swap_proof_commitments(str(ppath), str(wpath))
                return bool(ezkl.verify(str(ppath), str(settings_path), str(vk_path), srs_path=str(srs_path)))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return False

    @staticmethod
    def _commitment_witness(commitments: Sequence[str]) -> dict[str, Any]:
        return {
            "inputs": [],
            "pretty_elements": None,
            "outputs": [],
            "processed_inputs": {"poseidon_hash": None, "polycommit": [[c] for c in commitments]},
            "processed_params": None,
            "processed_outputs": None,
            "max_lookup_inputs": 0,
            "min_lookup_inputs": 0,
            "max_range_size": 0,
            "version": EZKL_VERSION,
        }

    def commit(self, felts: Sequence[str], vk_path: Path, settings_path: Path, srs_path: Path) -> str:
        """The compressed KZG commitment ezkl puts in a witness for a ``polycommit`` input."""
        if self.commit_memo is None:
            return self._commit(felts, vk_path, settings_path, srs_path)
        key = commitment_key(felts, vk_path, settings_path, srs_path)
        return self.commit_memo.get(key, lambda: self._commit(felts, vk_path, settings_path, srs_path))

    def _commit(self, felts: Sequence[str], vk_path: Path, settings_path: Path, srs_path: Path) -> str:
        try:
            points = ezkl.kzg_commit(list(felts), str(vk_path), str(settings_path), str(srs_path))
        except BaseException as exc:  # a pyo3 panic would otherwise kill the calling worker thread
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise BackendError(f"KZG commitment failed: {exc}") from exc
        if len(points) != 1:
            raise BackendError(f"expected one commitment point, got {len(points)}")
        return compress_point(points[0].x, points[0].y)


def witness_commitments(witness: dict[str, Any]) -> list[str]:
    """The per-input polycommit commitments a witness carries (one per input tensor)."""
    pc = (witness.get("processed_inputs") or {}).get("polycommit") or []
    out = []
    for entry in pc:
        if len(entry) != 1:
            raise BackendError(f"input committed as {len(entry)} points; expected one")
        out.append(str(entry[0]))
    return out
