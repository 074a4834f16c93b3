"""C-STORE written DICOM files to a PACS or any storage SCP (pynetdicom), with retries and a per-instance report.

One association carries every file; presentation contexts are the files' SOP classes, each in the file's
own transfer syntax (the exporters write explicit VR little endian, which every storage SCP accepts). A
file whose store fails is retried ``retries`` more times after ``backoff_s``, ``2 * backoff_s``, ... seconds;
when the association drops (abort, timeout, no response) the next attempt opens a new one. A status of
success or warning (0xB000, 0xB006, 0xB007) counts as accepted.

An association the node rejects, or a node that cannot be reached (on the first association or on a
reassociation), raises :class:`DicomSendError` naming ``host:port`` and the AETs; the report of what was
sent so far rides on the error. Files are only read: nothing written is ever changed or deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medaug.errors import MedaugError

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "MEDAUG"
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})  # stored, with coercion or elements discarded
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)
AET_MAX = 16


@dataclass(frozen=True)
class SentInstance:
    """The outcome for one file: its SOP instance UID, the last status (None: no response), attempts, why it failed."""

    path: Path
    sop_instance_uid: str
    status: int | None
    attempts: int
    error: str = ""


@dataclass
class SendReport:
    """What :func:`send_dicom` delivered: ``accepted`` and ``failed`` instances, in file order."""

    destination: str
    accepted: list[SentInstance] = field(default_factory=list)
    failed: list[SentInstance] = field(default_factory=list)
    associations: int = 0

    @property
    def ok(self) -> bool:
        """Every file was accepted."""
        return not self.failed

    def summary(self) -> str:
        return (f"{self.destination}: {len(self.accepted)} accepted, {len(self.failed)} failed, "
                f"{self.associations} association(s)")


class DicomSendError(MedaugError):
    """A DICOM node refused the association or could not be reached; ``report`` holds what was sent before."""

    def __init__(self, where: str, reason: str, report: SendReport | None = None):
        super().__init__(where, reason)
        self.report = report


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def send_dicom(files: Sequence[str | Path], host: str, port: int, called_aet: str,
               calling_aet: str = DEFAULT_CALLING_AET, retries: int = 2, timeout: float = 30.0,
               backoff_s: float = 0.5) -> SendReport:
    """C-STORE ``files`` to the storage SCP ``called_aet`` at ``host:port``; returns accepted/failed per instance.

    Args:
        files: DICOM Part 10 files (images, SEG); unreadable ones are reported as failed, never raised.
        host, port: the node's address.
        called_aet, calling_aet: the node's and our application entity titles (1-16 characters).
        retries: further attempts per instance after a failed store.
        timeout: seconds for connecting, association negotiation, each DIMSE response and the network.
        backoff_s: wait before the first retry of an instance; doubles for each further retry.

    Raises:
        DicomSendError: the node rejected the association or could not be reached (one line naming
            ``host:port`` and the AETs; ``error.report`` has the instances sent before).
    """
    destination = f"{host}:{port} (called AET {called_aet!r}, calling AET {calling_aet!r})"
    _check_arguments(destination, called_aet, calling_aet, retries, timeout)
    report = SendReport(destination=destination)
    headers = []
    for path in map(Path, files):
        header = _read_header(path, report)
        if header is not None:
            headers.append(header)
    if not headers:
        return report
    link = _Link(_application_entity(headers, calling_aet, timeout, destination), host, port, called_aet, report)
    try:
        for header in headers:
            _send_one(link, header, retries, backoff_s, report)
    finally:
        link.release()
    log.info("%s", report.summary())
    return report


def _check_arguments(destination: str, called_aet: str, calling_aet: str, retries: int, timeout: float) -> None:
    for name, aet in (("called AET", called_aet), ("calling AET", calling_aet)):
        if not isinstance(aet, str) or not aet.strip() or len(aet) > AET_MAX or not aet.isascii() or "\\" in aet:
            raise DicomSendError(destination, f"{name} {aet!r}; expected 1-{AET_MAX} ASCII characters, no '\\'")
    if retries < 0 or not timeout > 0:
        raise DicomSendError(destination, f"retries {retries}, timeout {timeout} s; expected retries ≥ 0, timeout > 0")


def _read_header(path: Path, report: SendReport) -> _Header | None:
    """The file's SOP class, instance and transfer syntax; a failed entry in ``report`` when unreadable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return _Header(path, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID),
                       str(dataset.file_meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError, EOFError, ValueError) as error:
        report.failed.append(SentInstance(path, "", None, 0, f"unreadable: {type(error).__name__}: {error}"))
        return None


def _application_entity(headers: Sequence[_Header], calling_aet: str, timeout: float, destination: str) -> Any:
    """A pynetdicom AE proposing one presentation context per (SOP class, transfer syntax) of ``headers``."""
    from pynetdicom import AE

    contexts = sorted({(header.sop_class_uid, header.transfer_syntax_uid) for header in headers})
    if len(contexts) > MAX_CONTEXTS:
        raise DicomSendError(destination, f"{len(contexts)} SOP class / transfer syntax pairs; expected at most "
                             f"{MAX_CONTEXTS} per association")
    entity = AE(ae_title=calling_aet)
    for sop_class_uid, transfer_syntax_uid in contexts:
        entity.add_requested_context(sop_class_uid, transfer_syntax_uid)
    entity.connection_timeout = entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = timeout
    return entity


class _Link:
    """The current association to the node, opened again when it has dropped."""

    def __init__(self, entity: Any, host: str, port: int, called_aet: str, report: SendReport):
        self.entity, self.host, self.port, self.called_aet, self.report = entity, host, port, called_aet, report
        self.association: Any = None

    def established(self) -> Any:
        """The live association, associating (again) first if there is none; raises DicomSendError."""
        if self.association is not None and self.association.is_established:
            return self.association
        association = self.entity.associate(self.host, self.port, ae_title=self.called_aet)
        if not association.is_established:
            raise DicomSendError(self.report.destination, _refusal(association), self.report)
        self.report.associations += 1
        self.association = association
        return association

    def drop(self) -> None:
        """Abandon the current association (after a store without a response) so the next store opens a new one."""
        if self.association is not None and self.association.is_established:
            self.association.abort()
        self.association = None

    def release(self) -> None:
        if self.association is not None and self.association.is_established:
            self.association.release()


def _refusal(association: Any) -> str:
    """Why an association was not established, as one line."""
    if association.is_rejected:
        primitive = association.acceptor.primitive
        detail = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}" if primitive else "rejected"
        return f"the node rejected the association ({detail}); expected it to accept these AETs and SOP classes"
    return "the node could not be reached or aborted the association; expected a DICOM storage SCP listening there"


def _send_one(link: _Link, header: _Header, retries: int, backoff_s: float, report: SendReport) -> None:
    """Store one file, retrying with backoff; appends it to ``report.accepted`` or ``report.failed``."""
    status, error = None, ""
    for attempt in range(1, retries + 2):
        if attempt > 1:
            time.sleep(backoff_s * 2 ** (attempt - 2))
        association = link.established()
        status, error = _store(association, header)
        if status == 0 or status in WARNING_STATUSES:
            report.accepted.append(SentInstance(header.path, header.sop_instance_uid, status, attempt))
            return
        if status is None:  # no response: the association is broken (even if its state has not caught up yet)
            link.drop()
        log.warning("%s: store of %s failed (%s), attempt %d of %d", report.destination, header.path, error,
                    attempt, retries + 1)
    report.failed.append(SentInstance(header.path, header.sop_instance_uid, status, retries + 1, error))


def _store(association: Any, header: _Header) -> tuple[int | None, str]:
    """One C-STORE of ``header.path``: (status, why it failed) with status None when no response came."""
    try:
        response = association.send_c_store(header.path)
    except (ValueError, RuntimeError, OSError, AttributeError) as error:
        return None, f"{type(error).__name__}: {error}"
    if "Status" not in response:
        return None, "no response (association aborted or timed out)"
    status = int(response.Status)
    return status, "" if status == 0 else f"status 0x{status:04X}"
