"""The one-call device: connect to a provider, enroll a model, answer deletions.

    device = EdgeDevice.connect("provider:50551", "my-model", provider_key=KEY, state_dir="state")
    device.enroll_model(model, ["fc1.weight"], x, y, nn.functional.cross_entropy)
    device.run()  # watch, apply, prove, submit, check each receipt and the provider's log

:meth:`EdgeDevice.connect` checks the provider's key against the pin, downloads the model's published
circuit, checks it and derives it on the device (:mod:`zkunlearn.client.published`); on a state folder it
already set up it reopens it instead, without downloading, deriving or enrolling anything
(:mod:`zkunlearn.client.device_state`). Everything it refuses raises :class:`DeviceError` with the reason.
The low-level pieces stay available: :attr:`EdgeDevice.client` (:class:`~zkunlearn.client.sdk.EdgeClient`)
and :attr:`EdgeDevice.unlearner`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy.typing as npt
from rich.console import Console
from torch import Tensor, nn
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.artifacts import ArtifactError
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.served import DEVICE_KINDS
from zkunlearn.proofs.specs import GroupObsSpec
from zkunlearn.proofs.srs import SrsError
from zkunlearn.v1 import provider_pb2 as pb

from .analytic_exact import ExactAnalyticUnlearner
from .artifacts import ArtifactDownloadError
from .committed_state import UnlearningError, load_state
from .device_run import AppliedInfo, RequestInfo, RunReporter
from .device_state import DeviceError, DeviceManifest, parse_provider_key, refuse_foreign_state
from .fisher import Curvature, LossFn
from .published import PublicationError, PublishedCircuit, fetch_published, open_published
from .records import Commitment, Outcome, UpdateResult, VerifiedRequest
from .sdk import EdgeClient
from .store import ClientStore, StoreError
from .transport import ChannelConfig, Transport, TransportError
from .unlearning import GroupObsUnlearner, ProveOptions
from .unlearning_exact import ExactGroupObsUnlearner

__all__ = ["AppliedInfo", "DeviceError", "DeviceProver", "EdgeDevice", "Enrollment", "RequestInfo"]

DeviceProver = GroupObsUnlearner | ExactGroupObsUnlearner | ExactAnalyticUnlearner

#: Errors of the pieces ``connect`` and ``enroll_*`` drive, reported as one :class:`DeviceError`.
_REFUSALS = (
    PublicationError,
    ArtifactError,
    ArtifactDownloadError,
    SrsError,
    StoreError,
    TransportError,
    UnlearningError,
    OSError,
)


@dataclass(frozen=True)
class Enrollment:
    """What the provider holds for this device: ``reopened`` when an earlier run had enrolled it."""

    client_id: str
    model_id: str
    kind: str
    layers: tuple[str, ...]
    commitments: int
    reopened: bool


class _NotEnrolled:
    def prove(self, request: VerifiedRequest) -> UpdateResult:
        raise DeviceError("the device has no enrolled model: call enroll_model() or enroll_head() first")


def _group_obs_commitments(enrolled: Any) -> tuple[list[Commitment], list[bytes]]:
    """Commitments and enrollment proofs of a Group-OBS enrollment (the fixed-point one has no proofs)."""
    if isinstance(enrolled, list):
        return enrolled, []
    return enrolled.commitments, enrolled.proofs


@contextmanager
def _refusals(what: str) -> Iterator[None]:
    """Re-raise the driven pieces' errors as one DeviceError saying what was being done."""
    try:
        yield
    except DeviceError:
        raise
    except grpc.RpcError as exc:
        raise DeviceError(f"{what}: the provider answered {exc.code().name}: {exc.details()}") from exc
    except _REFUSALS as exc:
        raise DeviceError(f"{what}: {exc}") from exc


class EdgeDevice:
    """One device bound to one provider and model, with its state in one folder; see the module doc."""

    def __init__(
        self,
        client: EdgeClient,
        published: PublishedCircuit,
        manifest: DeviceManifest,
        state_dir: Path,
        *,
        reopened: bool,
        prove_options: ProveOptions,
        console: Console,
    ) -> None:
        """Use :meth:`connect`."""
        self.client, self.published, self.manifest = client, published, manifest
        self.state_dir, self.reopened = state_dir, reopened
        self.prove_options, self.console = prove_options, console
        self.unlearner: DeviceProver | None = None

    # -- connecting ---------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: str | ChannelConfig,
        model_id: str,
        *,
        provider_key: bytes | str,
        state_dir: str | Path,
        client_id: str | None = None,
        kind: str | None = None,
        srs_sha256: str | None = None,
        allow_insecure_srs: bool = False,
        prove_options: ProveOptions | None = None,
        console: Console | None = None,
        receipt_wait_s: float = 600.0,
    ) -> EdgeDevice:
        """A device ready to enroll (or, on a folder it set up before, reopened as it was left).

        ``provider_key``: the provider's public key (32 bytes or hex), pinned out of band; a provider
        presenting another key is refused. ``kind`` picks one of the model's published circuits
        (``"group_obs_exact"``, ``"group_obs"``, ``"analytic_exact"``; default: the first of these it
        publishes). ``srs_sha256`` pins the SRS; a development SRS is refused unless
        ``allow_insecure_srs`` (tests and demos). ``address`` may be a
        :class:`~zkunlearn.client.transport.ChannelConfig` for TLS and retry settings.
        """
        started = time.monotonic()
        key = parse_provider_key(provider_key)
        folder = Path(state_dir).absolute()  # the program may change its working folder later
        console = console or Console(stderr=True)
        manifest = DeviceManifest.load(folder)
        if manifest is not None:
            manifest.check(folder, model_id, key, client_id)
            if kind is not None and kind != manifest.kind:
                raise DeviceError(f"state folder {folder} proves {manifest.kind!r} circuits, not {kind!r}")
        else:
            refuse_foreign_state(folder)
        config = address if isinstance(address, ChannelConfig) else _channel(address)
        with _refusals("cannot open a channel"):
            transport = Transport(config)
        try:
            _check_provider(transport, key, model_id)
            with _refusals(f"cannot get the circuit of model {model_id!r}"):
                if manifest is None:
                    kinds = DEVICE_KINDS if kind is None else (kind,)
                    published = fetch_published(
                        transport,
                        model_id,
                        folder,
                        kinds=kinds,
                        srs_sha256=srs_sha256,
                        allow_insecure_srs=allow_insecure_srs,
                    )
                    manifest = DeviceManifest(
                        model_id, client_id or DeviceManifest.new_client_id(), key.hex(), published.kind
                    )
                    manifest.save(folder)
                    reopened = False
                else:
                    published = open_published(folder, model_id, manifest.kind)
                    reopened = True
            with _refusals(f"cannot open the client store in {folder}"):
                store = ClientStore(folder / "client.db")
                client = EdgeClient(
                    transport, store, _NotEnrolled(), provider_public_key=key, receipt_wait_s=receipt_wait_s
                )
        except BaseException:
            transport.close()
            raise
        options = prove_options or ProveOptions(workers=1)
        device = cls(
            client, published, manifest, folder, reopened=reopened, prove_options=options, console=console
        )
        how = "reopened" if reopened else f"connected in {time.monotonic() - started:.1f} s"
        device._say(f"{how}: model {model_id!r}, {published.kind} circuit derived here, state in {folder}")
        return device

    # -- identity -----------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.manifest.client_id

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def kind(self) -> str:
        return self.published.kind

    @property
    def enrolled_layers(self) -> tuple[str, ...] | None:
        """The layers the provider accepted this device's enrollment of (None before it did)."""
        enrollment = self.client.store.get_json("enrollment")
        return tuple(enrollment["layers"]) if isinstance(enrollment, dict) else None

    # -- enrolling ----------------------------------------------------------------------------------

    def enroll_model(
        self,
        model: nn.Module,
        layers: Sequence[str],
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        exclude: Tensor | None = None,
        curvature: Curvature = "ggn",
        reconstruction_weight: float = 0.0,
        fisher_shift: int = 0,
        prover_class: Callable[..., GroupObsUnlearner | ExactGroupObsUnlearner] | None = None,
    ) -> Enrollment:
        """Commit to ``layers`` of ``model`` (with the curvature of ``inputs``/``targets``, see
        :meth:`zkunlearn.client.unlearning.GroupObsUnlearner.enroll`) and enroll with the provider.

        On a device enrolled before, nothing is computed or sent: the committed weights (deletions
        included) are written into ``model``, which then answers the next requests. Committed state the
        provider never acknowledged (a crash between the two) is sent again, not recomputed.
        ``prover_class`` replaces the kind's bundled unlearner (``ExactGroupObsUnlearner``,
        ``GroupObsUnlearner``) with a subclass, or anything called with the same arguments.
        """
        unlearner = self._group_obs_unlearner(model, prover_class)

        def commit() -> tuple[list[Commitment], list[bytes]]:
            return _group_obs_commitments(
                unlearner.enroll(
                    layers, inputs, targets, loss_fn, exclude, curvature, reconstruction_weight, fisher_shift
                )
            )

        return self._enroll(unlearner, tuple(layers), commit)

    def reenroll_model(
        self,
        model: nn.Module,
        layers: Sequence[str],
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        exclude: Tensor | None = None,
        curvature: Curvature = "ggn",
        reconstruction_weight: float = 0.0,
        fisher_shift: int = 0,
        prover_class: Callable[..., GroupObsUnlearner | ExactGroupObsUnlearner] | None = None,
        discard_state: bool = False,
    ) -> Enrollment:
        """Recover a device whose committed state is lost or corrupted: commit to ``model`` afresh (same
        arguments as :meth:`enroll_model`, same layers) and re-enroll under the same client id, signed by
        the device key; the provider logs the rotation and judges later deletions against the new
        commitments.

        The old ``committed/`` folder is kept as ``committed.replaced-<n>``, never deleted. A readable
        committed state is replaced only with ``discard_state=True`` (a state that no longer matches
        the provider's commitments: every proof from it is refused). Refused by the provider while a
        deletion request to this device is open (answer it, or let it expire). A re-enrollment cut
        before the provider acknowledged it is sent again by the next call, not recomputed.
        """
        unlearner = self._group_obs_unlearner(model, prover_class)

        def commit() -> tuple[list[Commitment], list[bytes]]:
            return _group_obs_commitments(
                unlearner.enroll(
                    layers, inputs, targets, loss_fn, exclude, curvature, reconstruction_weight, fisher_shift
                )
            )

        return self._reenroll(unlearner, tuple(layers), commit, discard_state, "enroll_model()")

    def _reenroll(
        self,
        unlearner: DeviceProver,
        layers: tuple[str, ...],
        commit: Callable[[], tuple[list[Commitment], list[bytes]]],
        discard_state: bool,
        enroll_call: str,
    ) -> Enrollment:
        enrolled = self.enrolled_layers
        if enrolled is None:
            raise DeviceError(f"the device was never enrolled: use {enroll_call}")
        if enrolled != layers:
            raise DeviceError(
                f"this device enrolled {list(enrolled)} of model {self.model_id!r}; a re-enrollment keeps "
                f"them, not {list(layers)}"
            )
        with _refusals(f"cannot re-enroll with model {self.model_id!r}"):
            committed = self._unacknowledged_reenrollment(unlearner, enrolled)
            if committed is not None:
                unlearner.load_model()
            else:
                self._set_aside(discard_state)
                self._say(f"committing afresh to {', '.join(layers)} and proving the enrollment")
                committed = commit()
                self.client.store.put_json("reenrollment", [c.to_json() for c in committed[0]])
            self.client.reenroll(*committed)
            self.client.store.put_json("reenrollment", None)
            self._say(f"re-enrolled as {self.client_id} with fresh commitments")
        self.unlearner = unlearner
        self.client.prover = unlearner
        return Enrollment(
            self.client_id, self.model_id, self.kind, enrolled, len(committed[0]), reopened=False
        )

    def _unacknowledged_reenrollment(
        self, unlearner: DeviceProver, layers: tuple[str, ...]
    ) -> tuple[list[Commitment], list[bytes]] | None:
        """The re-enrollment committed before a crash and not yet acknowledged, if the state holds it."""
        pending = self.client.store.get_json("reenrollment")
        if not isinstance(pending, list):
            return None
        try:
            saved = self._saved_enrollment(unlearner, layers)
        except (UnlearningError, DeviceError, KeyError):
            return None
        return saved if [c.to_json() for c in saved[0]] == pending else None

    def _set_aside(self, discard_state: bool) -> None:
        """Move the committed folder out of the way (kept), refusing a readable one unless asked."""
        folder = self._committed
        if not folder.exists():
            return
        try:
            load_state(folder)
        except UnlearningError:
            pass  # unreadable: what a re-enrollment is for
        else:
            if not discard_state:
                raise DeviceError(
                    f"{folder} holds a readable committed state; re-enroll only when it is lost or no longer "
                    "matches the provider's commitments (its proofs are refused): pass discard_state=True"
                )
        n = 1
        while folder.with_name(f"committed.replaced-{n}").exists():
            n += 1
        folder.rename(folder.with_name(f"committed.replaced-{n}"))

    def _group_obs_unlearner(
        self,
        model: nn.Module,
        prover_class: Callable[..., GroupObsUnlearner | ExactGroupObsUnlearner] | None,
    ) -> GroupObsUnlearner | ExactGroupObsUnlearner:
        spec, circuits, folder = self.published.spec, self.published.circuits, self._committed
        if isinstance(spec, ExactGroupObsSpec):
            make = prover_class or ExactGroupObsUnlearner
            return make(model, spec, circuits[0], circuits[1], folder, self.prove_options)
        if isinstance(spec, GroupObsSpec):
            make = prover_class or GroupObsUnlearner
            return make(model, spec, circuits[0], folder, self.prove_options)
        raise DeviceError(
            f"model {self.model_id!r} is published with an exact analytic head: use enroll_head()"
        )

    def enroll_head(self, features: npt.ArrayLike, targets: npt.ArrayLike) -> Enrollment:
        """Learn and enroll the exact analytic head from ``features`` (``n x d``) and ``targets`` (class
        indices or ``n x k``); on a device enrolled before, reopen it. :meth:`predict` scores with it."""
        unlearner = self._analytic_unlearner()

        def commit() -> tuple[list[Commitment], list[bytes]]:
            enrolled = unlearner.enroll(features, targets)
            return enrolled.commitments, enrolled.proofs

        return self._enroll(unlearner, ("head",), commit)

    def reenroll_head(
        self, features: npt.ArrayLike, targets: npt.ArrayLike, *, discard_state: bool = False
    ) -> Enrollment:
        """Recover an analytic-head device whose committed state is lost or corrupted: learn the head
        afresh from ``features``/``targets`` and re-enroll, as :meth:`reenroll_model` does for Group-OBS
        (same folder handling, same refusals)."""
        unlearner = self._analytic_unlearner()

        def commit() -> tuple[list[Commitment], list[bytes]]:
            enrolled = unlearner.enroll(features, targets)
            return enrolled.commitments, enrolled.proofs

        return self._reenroll(unlearner, ("head",), commit, discard_state, "enroll_head()")

    def _analytic_unlearner(self) -> ExactAnalyticUnlearner:
        spec = self.published.spec
        if not isinstance(spec, ExactAnalyticSpec):
            raise DeviceError(f"model {self.model_id!r} is published for Group-OBS: use enroll_model()")
        return ExactAnalyticUnlearner(spec, self.published.circuits[0], self._committed, self.prove_options)

    def predict(self, features: npt.ArrayLike) -> Any:
        """Scores of the committed exact analytic head (after deletions, the retrained one)."""
        if not isinstance(self.unlearner, ExactAnalyticUnlearner):
            raise DeviceError("predict() scores an enrolled exact analytic head (enroll_head())")
        return self.unlearner.predict(features)

    @property
    def _committed(self) -> Path:
        return self.state_dir / "committed"

    def _enroll(
        self,
        unlearner: DeviceProver,
        layers: tuple[str, ...],
        commit: Callable[[], tuple[list[Commitment], list[bytes]]],
    ) -> Enrollment:
        enrolled = self.enrolled_layers
        if enrolled is not None and enrolled != layers:
            raise DeviceError(
                f"this device enrolled {list(enrolled)} of model {self.model_id!r}; enrolling {list(layers)} "
                f"would overwrite its committed state: use another state folder"
            )
        with _refusals(f"cannot enroll with model {self.model_id!r}"):
            if enrolled is not None:
                unlearner.load_model()
            else:
                started = time.monotonic()
                if (self._committed / "state.json").exists():
                    commitments, proofs = self._saved_enrollment(unlearner, layers)
                    unlearner.load_model()
                else:
                    self._say(f"committing to {', '.join(layers)} and proving the enrollment")
                    commitments, proofs = commit()
                self.client.enroll(
                    self.client_id,
                    self.model_id,
                    layers,
                    self.published.update_kind,
                    commitments,
                    proofs,
                )
                self._say(f"enrolled as {self.client_id} in {time.monotonic() - started:.1f} s")
        self.unlearner = unlearner
        self.client.prover = unlearner
        return Enrollment(
            self.client_id,
            self.model_id,
            self.kind,
            layers,
            len(self.client.commitments),
            reopened=enrolled is not None,
        )

    def _saved_enrollment(
        self,
        unlearner: DeviceProver,
        layers: tuple[str, ...],
    ) -> tuple[list[Commitment], list[bytes]]:
        """The enrollment committed before a crash, refused if it is of other layers."""
        _arrays, meta = load_state(self._committed)
        saved = tuple(meta.get("layers", {})) if layers != ("head",) else ("head",)
        if saved != layers:
            raise DeviceError(
                f"{self._committed} holds an enrollment of {list(saved)} the provider never acknowledged, "
                f"not of {list(layers)}: enroll those layers, or remove the folder to start over"
            )
        if isinstance(unlearner, GroupObsUnlearner):
            return [Commitment.from_json(c) for c in meta["commitments"]], []
        saved_enrollment = unlearner.saved_enrollment()
        return saved_enrollment.commitments, saved_enrollment.proofs

    # -- answering deletions ------------------------------------------------------------------------

    def run(
        self,
        *,
        max_requests: int | None = None,
        until: threading.Event | None = None,
        timeout_s: float | None = None,
        on_request: Callable[[RequestInfo], None] | None = None,
        on_applied: Callable[[AppliedInfo], None] | None = None,
        verify_log: bool = True,
    ) -> list[Outcome]:
        """Watch for deletion requests and answer each: check it, apply and prove the update, submit,
        check the receipt and (``verify_log``) that the provider's log holds every receipt and only grew.

        Returns the outcomes after ``max_requests`` of them, when ``until`` is set, after ``timeout_s``,
        or (raising) when the provider stays unreachable for a minute. ``on_request`` is called before
        a request is applied (the model still holds its weights), ``on_applied`` after each outcome
        (an accepted one's weights are in the model). Progress goes to the console line by line.
        """
        if self.unlearner is None:
            raise DeviceError("the device has no enrolled model: call enroll_model() or enroll_head() first")
        stop = until or threading.Event()
        reporter = RunReporter(
            self.unlearner,
            self.client_id,
            self.console,
            on_request,
            on_applied,
            self.client.verify_log if verify_log else None,
        )
        timer = threading.Timer(timeout_s, stop.set) if timeout_s is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        self.client.prover = reporter
        self._say("waiting for deletion requests")
        try:
            return self.client.watch(stop, max_requests=max_requests, on_outcome=reporter.outcome)
        finally:
            self.client.prover = self.unlearner
            if timer is not None:
                timer.cancel()

    # -- the ledger ---------------------------------------------------------------------------------

    def verify_log(self) -> int:
        """Check every stored receipt is in the provider's log and the log only grew; returns its size."""
        return self.client.verify_log()

    def known_head(self) -> dict[str, Any] | None:
        """The signed tree head the receipts were last verified under: evidence for an auditor
        (``zkunlearn audit verify --known-head``)."""
        return self.client.known_head()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EdgeDevice:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _say(self, message: str) -> None:
        self.console.print(f"[{self.client_id}] {message}", markup=False, highlight=False, soft_wrap=True)


def _channel(address: str) -> ChannelConfig:
    """Proofs and receipts can take minutes on a device: long call timeouts, patient retries."""
    return ChannelConfig(address, call_timeout_s=300.0, retry_attempts=20, retry_budget_s=120.0)


def _check_provider(transport: Transport, key: bytes, model_id: str) -> None:
    target = transport.config.target
    try:
        info: pb.GetInfoResponse = transport.call(
            lambda: transport.stub.GetInfo(pb.GetInfoRequest(), timeout=transport.timeout)
        )
    except grpc.RpcError as exc:
        reason = f"{exc.code().name}: {exc.details()}"
        raise DeviceError(f"cannot reach the provider at {target}: {reason}") from exc
    served = bytes(info.provider_public_key)
    if served != key:
        raise DeviceError(
            f"the provider at {target} presents key {served.hex()}, not the pinned {key.hex()}: "
            "a wrong pin, or another provider than the one meant"
        )
    if info.model_ids and model_id not in info.model_ids:
        served_ids = list(info.model_ids)
        raise DeviceError(f"unknown model {model_id!r}: the provider at {target} serves {served_ids}")
