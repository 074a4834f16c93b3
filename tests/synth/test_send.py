"""C-STORE to a real storage SCP: dcmtk's ``storescp`` on 127.0.0.1 receives what ``send_dicom`` sends."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from medaug.synth.export.dicom import write_dicom_sample
from medaug.synth.send import DicomSendError, send_dicom
from tests.synth.test_dicom_export import OPTIONS, ct_sample, mr_sample

SCP_AET = "MEDAUG_TEST"
START_TIMEOUT_S = 10.0


def dcmtk_storescp() -> str | None:
    """dcmtk's storescp on PATH (pynetdicom installs a Python app of the same name into the venv)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "storescp"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return str(candidate)
    return None


STORESCP = dcmtk_storescp()
pytestmark = pytest.mark.skipif(STORESCP is None, reason="dcmtk storescp not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_listener(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"storescp did not listen on port {port}")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator:
    """Start dcmtk storescp with extra options; yields (port, folder of received files); stopped by pid."""
    processes = []

    def start(*options: str) -> tuple[int, Path]:
        port, received = free_port(), tmp_path / f"received{len(processes)}"
        received.mkdir()
        process = subprocess.Popen([STORESCP, "-aet", SCP_AET, "-od", str(received), "+xa", *options, str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        wait_for_listener(port, process)
        return port, received

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def written(tmp_path: Path) -> list[Path]:
    """A CT sample (image + SEG) and an MR sample (two channels + SEG): four SOP classes."""
    out = tmp_path / "dicom"
    return [*write_dicom_sample(ct_sample(), out, OPTIONS), *write_dicom_sample(mr_sample(), out, OPTIONS)]


def digests(paths: list[Path]) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def sop_uids(paths) -> list[str]:
    return sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths)


def test_round_trip_delivers_every_instance(storescp, written, tmp_path):
    port, received = storescp()
    before = digests(written)
    missing = tmp_path / "gone.dcm"
    report = send_dicom([*written, missing], "127.0.0.1", port, SCP_AET, retries=1)
    assert sop_uids(received.iterdir()) == sop_uids(written)
    assert [item.path for item in report.accepted] == written and report.associations == 1
    assert [(item.path, item.status) for item in report.failed] == [(missing, None)]
    assert "unreadable" in report.failed[0].error and not report.ok
    assert digests(written) == before
    for sent in written:  # storescp stores what it got: the same pixels
        copy = next(path for path in received.iterdir() if path.name.endswith(pydicom.dcmread(sent).SOPInstanceUID))
        assert pydicom.dcmread(copy).PixelData == pydicom.dcmread(sent).PixelData


def test_rejected_association_is_a_clear_error_and_keeps_files(storescp, written):
    port, received = storescp("--refuse")
    before = digests(written)
    messages = []
    # storescp closes the socket right after its A-ASSOCIATE-RJ; under load the close can overtake the
    # reject (the client then sees an abort, also a clear error): a few attempts see the reject itself
    for _ in range(5):
        with pytest.raises(DicomSendError) as info:
            send_dicom(written, "127.0.0.1", port, SCP_AET, calling_aet="MEDAUG", timeout=5)
        messages.append(str(info.value))
        assert info.value.report is not None and info.value.report.accepted == []
        if "rejected" in messages[-1]:
            break
    for message in messages:
        assert f"127.0.0.1:{port}" in message and SCP_AET in message and "MEDAUG" in message
        assert "\n" not in message
    assert "rejected" in messages[-1], messages
    assert digests(written) == before and not list(received.iterdir())


def test_unreachable_node_is_a_clear_error_and_keeps_files(written):
    port = free_port()  # nothing listens there
    before = digests(written)
    with pytest.raises(DicomSendError, match=rf"127\.0\.0\.1:{port}.*{SCP_AET}.*could not be reached"):
        send_dicom(written, "127.0.0.1", port, SCP_AET, timeout=3)
    assert digests(written) == before


def test_dropped_associations_are_reopened_and_retried_then_reported(storescp, written):
    port, _ = storescp("--abort-after")  # aborts every association once a C-STORE request arrives
    before = digests(written)
    report = send_dicom(written[:2], "127.0.0.1", port, SCP_AET, retries=1, timeout=5, backoff_s=0.01)
    assert report.accepted == [] and [item.path for item in report.failed] == written[:2]
    assert [item.attempts for item in report.failed] == [2, 2]
    assert report.associations == 4  # one new association per attempt after each drop
    assert digests(written) == before


def test_bad_aet_is_refused_before_connecting(written):
    with pytest.raises(DicomSendError, match="called AET"):
        send_dicom(written, "127.0.0.1", free_port(), "A" * 17)
