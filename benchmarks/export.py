"""Benchmark: exporting labelled 256² slices as PNG, NIfTI and DICOM files (``medaug.synth.export.export_batch``).

DESIGN §5 targets on 2 cores: PNG and NIfTI >= 1,000 slices/s each (a slice = its channels + its label);
DICOM images >= 300 slices/s (a slice = one instance per channel); DICOM SEG measured.

    python benchmarks/export.py                                   # 2,000 samples per case, 3 rounds
    python benchmarks/export.py --samples 500 --repeats 1         # quick look
    python benchmarks/export.py --json-out benchmarks/results/export-cpu2.json

Data. One CT abdomen phantom (1 channel, ``ct/abdomen``, W400/L40) and one MR prostate phantom (2 channels,
``t2`` + ``adc``, percentile mappings) are written and prepared at the recipes' 256² (``medaug phantoms`` +
``medaug prepare``, untimed); their slices, cycled, become ``--samples`` samples per domain with distinct
ids, the canonical axial affine of the domain spacing (as synthetic samples get), the rows' intensity
mappings, and a series key per chunk of 256 with instance numbers 1..256 (as the engine sets them: one DICOM
series per batch). Building the :class:`ExportSlice` objects is not timed (the engine builds them).

Protocol. Each case calls ``export_batch`` on chunks of 256 samples (one engine batch) into an empty folder;
a round's rate is samples / seconds for all chunks; the median of ``--repeats`` rounds is reported, after one
untimed warm-up round (imports, header cache). Files go through the page cache (no fsync, as the exporters
write them). Two storages: ``tmpfs`` (``/dev/shm``: the exporters' own cost on the 2 cores; the headline and
``pass``) and ``disk`` (``--tmp``, default the system temp folder: what this machine's disk allows; the
``png`` and ``nifti`` cases only). ``disk_write_mb_per_s`` times plain 256 kB file writes to each storage in
the same run, so ``bytes_per_slice`` / that rate bounds what any exporter can reach there.
Cases: ``png`` (16-bit channels, stored, label at zlib level 1) and ``nifti`` (``.nii``, int16 HU / float32
a.u. + uint8 label) with 2 worker threads are the targets; ``png_16bit_zlib1``, ``png_8bit_window``,
``nifti_gz`` and ``nifti_per_slice_affine`` (``--samples`` / 4 samples with a distinct affine each, as real
slices have, the header cache emptied before each round) show the costs of the alternatives; ``*_1_worker``
shows the thread scaling; ``reference_pillow_png`` (``medaug.io.png.write_png``) and
``reference_write_nifti`` (``medaug.io.nifti.write_nifti``, nibabel) write the same files one by one
without the exporters (``--reference-samples``).
DICOM cases: ``dicom`` (CT/MR Image Storage, images only, ``seg=False``) is the target; ``dicom_1_worker``,
``dicom_sc`` (Secondary Capture) and ``dicom_with_seg`` (images + one SEG per sample with a structure,
``--seg-samples``) for comparison; ``seg`` writes the SEGs alone (highdicom, 2 threads; the source image's
header is built in memory, about 0.1 ms) over the ``--seg-samples`` samples that hold a structure, so its
rate is SEGs/s; ``reference_write_dicom_series`` writes each sample's channels with
``medaug.io.dicom.write.write_dicom_series`` (a pydicom Dataset per file, ``dcmwrite``).
``bytes_per_slice`` is the mean size of a sample's files. Prints one JSON object with machine, commit and the
load average before and after (the sandbox is shared).

Measured on the 2-core sandbox (``results/export-cpu2.json``, 2,000 samples per case, 3 rounds; load average
3.0 before, 4.7 after), tmpfs: PNG 1,511 CT / 1,115 MR slices/s, NIfTI 2,334 / 1,049 (target met, MR's two
channels the slower case; one worker thread: PNG 1,963 / 1,041, NIfTI 2,665 / 1,131); on the sandbox disk
PNG 610 / 457 and NIfTI 569 / 460. References: Pillow PNG 133 / 18 slices/s, nibabel ``write_nifti``
487 / 214. The sandbox varies by up to ±30 % between runs: the run before (same code but one small change)
gave PNG 1,651 / 989, NIfTI 2,319 / 787; six runs alternating the PNG writer with its previous version
(``--cases png,png_1_worker,nifti,nifti_1_worker``) gave MR PNG 807-1,231 against 604-820 slices/s.
DICOM, measured 2026-11-28 while other jobs loaded the 2-core sandbox (load average 7-9; PNG and NIfTI ran at
488 / 406 and 576 / 511 in that same run, about a third of the quiet-machine figures above): images 987 CT /
573 MR slices/s to tmpfs (one worker: 2,064 / 518), Secondary Capture 1,492 / 551, to disk 221 / 138; the
one-Dataset-per-file reference ``write_dicom_series`` 108 / 69; SEG alone 28 / 23 SEGs/s and images + SEG
20 / 23 slices/s: highdicom's ``Segmentation`` costs about 15 ms of CPU per single-frame SEG and pydicom's
``dcmwrite`` of it about 4 ms, against 0.1 ms for an image instance from its series template.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import common
import numpy as np

try:
    import medaug  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medaug.synth.export import DicomOptions, ExportSlice, NiftiOptions, PngOptions, canonical_affine, export_batch

REPO = Path(__file__).resolve().parents[1]
TARGET_SLICES_PER_S = 1000
TARGET_DICOM_SLICES_PER_S = 300
DICOM = DicomOptions(model_name="benchmark", model_sha256="0" * 64, run_uid="benchmark-export", seg=False)
DICOM_SEG = DicomOptions(model_name="benchmark", model_sha256="0" * 64, run_uid="benchmark-export")
DICOM_SC = DicomOptions(model_name="benchmark", model_sha256="0" * 64, run_uid="benchmark-export", sop="sc", seg=False)
CHUNK = 256
DOMAINS = {"ct_abdomen": "ct/abdomen", "mr_prostate": "mr/prostate"}


def prepare_phantoms(workdir: Path) -> Path:
    """One phantom per domain, prepared with the recipes' own domains (256²); returns the prepared folder."""
    import yaml

    from medaug.config.recipes import load_prepare_recipe
    from medaug.phantoms import write_phantoms
    from medaug.prepare.pipeline import run_prepare

    sources, domains = [], {}
    for name in DOMAINS:
        write_phantoms(workdir / "phantoms", domains=[name], n=1, seed=7)
        recipe_path = REPO / f"recipes/datasets/phantom_{name}.yaml"
        sources.append({"path": str(workdir / "phantoms" / name), "dataset": str(recipe_path)})
        domain = dict(yaml.safe_load(recipe_path.read_text())["domain"])
        domains[domain.pop("name")] = domain
    recipe = workdir / "prepare.yaml"
    recipe.write_text(yaml.safe_dump({"sources": sources, "domains": domains}))
    out = workdir / "prepared"
    run_prepare(load_prepare_recipe(recipe), out)
    return out


def load_samples(prepared: Path, domain: str, count: int, per_slice_affine: bool = False) -> list[ExportSlice]:
    """``count`` samples of ``domain`` cycling over its prepared slices (canonical affine unless asked)."""
    from medaug.data.index import read_index
    from medaug.data.shards import ShardStore

    rows = [row for row in read_index(prepared / "index.parquet").to_pylist() if row["domain"] == domain]
    store = ShardStore(prepared)
    slices = [store.read(row["shard"], row["shard_row"]) for row in rows]
    samples = []
    for number in range(count):
        row, (image_CHW, label_HW) = rows[number % len(rows)], slices[number % len(rows)]
        spacing = float(row["spacing_mm"][0])
        affine = canonical_affine(spacing, image_CHW.shape[1:], slice_thickness_mm=row["slice_thickness_mm"])
        if per_slice_affine:
            affine[2, 3] += number * row["slice_thickness_mm"]  # every sample its own position
        samples.append(ExportSlice(
            sample_id=f"bench{number:06d}", image_CHW=image_CHW.astype(np.float32), label_HW=label_HW,
            channels=tuple(row["channels"]), affine=affine, intensity=tuple(json.loads(row["intensity"])),
            structures=tuple(row["structures_present"]), domain=domain,
            series_key=f"batch{number // CHUNK:04d}", instance_number=number % CHUNK + 1))
    return samples


def export_chunks(samples: Sequence[ExportSlice], out: Path, formats: tuple[str, ...], workers: int,
                  png: PngOptions, nifti: NiftiOptions, dicom: DicomOptions = DICOM) -> None:
    for start in range(0, len(samples), CHUNK):
        export_batch(samples[start:start + CHUNK], out, formats, png=png, nifti=nifti, dicom=dicom, workers=workers)


def write_segs(samples: Sequence[ExportSlice], out: Path, workers: int = 2) -> None:
    """Only the DICOM SEG of each sample (all hold a structure), on ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from medaug.synth.export.base import write_bytes_atomic
    from medaug.synth.export.dicom import dicom_paths, image_file, seg_file

    def one(sample: ExportSlice) -> None:
        header, _ = image_file(sample, 0, DICOM_SEG)
        write_bytes_atomic(dicom_paths(sample, out, DICOM_SEG)[-1], seg_file(sample, header, DICOM_SEG))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, samples))


def reference_write_dicom_series(samples: Sequence[ExportSlice], out: Path) -> None:
    """Each sample's channels through ``medaug.io.dicom.write.write_dicom_series`` (a Dataset per file), one by one."""
    from medaug.io.dicom.write import write_dicom_series
    from medaug.io.volume import Volume
    from medaug.synth.export.nifti import channel_values

    for sample in samples:
        for channel, name in enumerate(sample.channels):
            values_JI = channel_values(sample, channel).T  # the writer's slice k is array[0, :, :, k].T
            volume = Volume(values_JI[None, :, :, None], sample.affine[:, [1, 0, 2, 3]])
            modality = "CT" if sample.intensity[channel].units == "HU" else "MR"
            write_dicom_series(volume, out / f"{sample.sample_id}_{name}", modality=modality,
                               series_description=f"SYNTHETIC {name}", patient_name="SYNTHETIC^MEDAUG",
                               extra={"PatientIdentityRemoved": "YES", "BurnedInAnnotation": "NO"})


def reference_pillow_png(samples: Sequence[ExportSlice], out: Path) -> None:
    """The same 16-bit channel + label files through Pillow (``medaug.io.png.write_png``), one by one."""
    from medaug.io.png import write_png
    from medaug.synth.export.png import model_to_uint16

    for sample in samples:
        for channel, name in enumerate(sample.channels):
            write_png(model_to_uint16(sample.image_CHW[channel]), out / f"{sample.sample_id}_{name}.png")
        write_png(sample.label_HW, out / f"{sample.sample_id}_label.png")


def reference_write_nifti(samples: Sequence[ExportSlice], out: Path) -> None:
    """The same channel + label ``.nii`` files through nibabel (``medaug.io.nifti.write_nifti``), one by one."""
    from medaug.io.nifti import write_nifti
    from medaug.io.volume import Volume
    from medaug.synth.export.nifti import channel_values

    for sample in samples:
        for channel, name in enumerate(sample.channels):
            volume = Volume(channel_values(sample, channel)[None, :, :, None], sample.affine)
            write_nifti(volume, out / f"{sample.sample_id}_{name}.nii")
        write_nifti(Volume(sample.label_HW[None, :, :, None], sample.affine), out / f"{sample.sample_id}_label.nii")


def time_case(run: Callable[[Path], None], samples: int, tmp: Path, repeats: int) -> dict:
    """Median samples/s over ``repeats`` rounds after a warm-up; each round writes into a fresh folder."""
    rates, sizes = [], []
    for round_number in range(repeats + 1):
        out = Path(tempfile.mkdtemp(dir=tmp))
        start = time.perf_counter()
        run(out)
        seconds = time.perf_counter() - start
        sizes.append(sum(path.stat().st_size for path in out.rglob("*") if path.is_file()) / samples)
        shutil.rmtree(out)
        if round_number:
            rates.append(samples / seconds)
    return {"slices_per_s": round(statistics.median(rates)), "runs": [round(rate) for rate in rates],
            "bytes_per_slice": round(sizes[-1])}


def uncached(run: Callable[[Path], None]) -> Callable[[Path], None]:
    """``run`` with the NIfTI header cache emptied first, so every distinct affine builds its header."""
    from medaug.synth.export.nifti import _cached_header

    def cold(out: Path) -> None:
        _cached_header.cache_clear()
        run(out)

    return cold


def cases(samples: list[ExportSlice], per_slice: list[ExportSlice], reference_count: int,
          seg_count: int) -> dict[str, Callable]:
    from medaug.synth.export.dicom import structure_ids

    default_png, default_nifti = PngOptions(), NiftiOptions()

    def batch(chosen, formats, workers=2, png=default_png, nifti=default_nifti, dicom=DICOM):
        return lambda out: export_chunks(chosen, out, formats, workers, png, nifti, dicom)

    subset = samples[:reference_count]
    labelled = [sample for sample in samples if structure_ids(sample.label_HW).size]
    seg_subset, dicom_subset = labelled[:seg_count], samples[:seg_count]
    table = {
        "png": (batch(samples, ("png",)), len(samples)),
        "png_1_worker": (batch(samples, ("png",), workers=1), len(samples)),
        "png_16bit_zlib1": (batch(samples, ("png",), png=PngOptions(compress_level=1)), len(samples)),
        "png_8bit_window": (batch(samples, ("png",), png=PngOptions(bits=8)), len(samples)),
        "nifti": (batch(samples, ("nifti",)), len(samples)),
        "nifti_1_worker": (batch(samples, ("nifti",), workers=1), len(samples)),
        "nifti_gz": (batch(samples, ("nifti",), nifti=NiftiOptions(compress=True)), len(samples)),
        "nifti_per_slice_affine": (uncached(batch(per_slice, ("nifti",))), len(per_slice)),
        "reference_pillow_png": (lambda out: reference_pillow_png(subset, out), len(subset)),
        "reference_write_nifti": (lambda out: reference_write_nifti(subset, out), len(subset)),
        "dicom": (batch(samples, ("dicom",)), len(samples)),
        "dicom_1_worker": (batch(samples, ("dicom",), workers=1), len(samples)),
        "dicom_sc": (batch(samples, ("dicom",), dicom=DICOM_SC), len(samples)),
        "dicom_with_seg": (batch(dicom_subset, ("dicom",), dicom=DICOM_SEG), len(dicom_subset)),
        "seg": (lambda out: write_segs(seg_subset, out), len(seg_subset)),
        "reference_write_dicom_series": (lambda out: reference_write_dicom_series(subset, out), len(subset)),
    }
    assert tuple(table) == CASE_NAMES, "CASE_NAMES lists the cases, in order"
    return table


CASE_NAMES = ("png", "png_1_worker", "png_16bit_zlib1", "png_8bit_window", "nifti", "nifti_1_worker", "nifti_gz",
              "nifti_per_slice_affine", "reference_pillow_png", "reference_write_nifti", "dicom", "dicom_1_worker",
              "dicom_sc", "dicom_with_seg", "seg", "reference_write_dicom_series")


def write_throughput_mb_per_s(folder: Path, files: int = 1000, size: int = 256 * 1024) -> float:
    """Plain ``open``/``write`` of ``files`` files of ``size`` bytes: the storage's own rate, MB/s."""
    payload = os.urandom(size)
    target = Path(tempfile.mkdtemp(dir=folder))
    start = time.perf_counter()
    for number in range(files):
        with open(target / f"f{number}", "wb") as handle:
            handle.write(payload)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return round(files * size / seconds / 1e6)


def storages(workdir: Path) -> dict[str, Path]:
    """``tmpfs`` (/dev/shm, when there) and ``disk`` (the work folder)."""
    found = {"disk": workdir}
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        found["tmpfs"] = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="medaug-export-bench-"))
    return found


def measure(prepared: Path, storage: Path, names: Sequence[str] | None, args: argparse.Namespace) -> dict:
    """Every case (or those in ``names``) for both domains, written under ``storage``."""
    results = {}
    for domain in DOMAINS.values():
        samples = load_samples(prepared, domain, args.samples)
        per_slice = load_samples(prepared, domain, max(1, args.samples // 4), per_slice_affine=True)
        table = {name: case for name, case in cases(samples, per_slice, args.reference_samples,
                                                    args.seg_samples).items()
                 if names is None or name in names}
        results[domain] = {"channels": len(samples[0].channels),
                           **{name: time_case(fn, count, storage, args.repeats) for name, (fn, count) in table.items()}}
    return results


def headline(results: dict, formats: Sequence[str] = ("png", "nifti", "dicom", "seg")) -> dict[str, int]:
    """The slower domain's rate per format (of those measured)."""
    return {fmt: min(results[domain][fmt]["slices_per_s"] for domain in results)
            for fmt in formats if all(fmt in results[domain] for domain in results)}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    prepared = Path(args.data) if args.data else prepare_phantoms(workdir)
    load_before = os.getloadavg()[0]
    places = storages(workdir)
    chosen = args.cases.split(",") if args.cases else None
    disk_cases = [name for name in ("png", "nifti", "dicom") if chosen is None or name in chosen]
    by_storage = {name: {"path": str(path), "disk_write_mb_per_s": write_throughput_mb_per_s(path),
                         "by_domain": measure(prepared, path, chosen if name == "tmpfs" else disk_cases, args)}
                  for name, path in sorted(places.items(), reverse=True)}
    if "tmpfs" in places:
        shutil.rmtree(places["tmpfs"], ignore_errors=True)
    main = by_storage.get("tmpfs", by_storage["disk"])
    rates = headline(main["by_domain"])
    return {
        "benchmark": "export",
        "what": "labelled 256² slices/s written by export_batch (channels + label per slice; DICOM: one image "
                "instance per channel, SEG: one SEG per slice, alone), 2 worker threads; headline = the slower of "
                "CT (1 channel) and MR (2 channels), written to tmpfs",
        "target_slices_per_s": TARGET_SLICES_PER_S,
        "target_dicom_slices_per_s": TARGET_DICOM_SLICES_PER_S,
        "slices_per_s": rates,
        "pass": all(rates[fmt] >= TARGET_SLICES_PER_S for fmt in ("png", "nifti"))
                and rates["dicom"] >= TARGET_DICOM_SLICES_PER_S if {"png", "nifti", "dicom"} <= rates.keys() else None,
        "slices_per_s_disk": headline(by_storage["disk"]["by_domain"]),
        "samples_per_case": args.samples,
        "seg_samples_per_case": args.seg_samples,
        "repeats": args.repeats,
        "by_storage": by_storage,
        "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": machine(),
        **commit(),
    }


def machine() -> dict:
    import highdicom
    import nibabel
    import pydicom

    return common.machine(numpy=np.__version__, nibabel=nibabel.__version__, zlib=__import__("zlib").ZLIB_RUNTIME_VERSION,
                          pydicom=pydicom.__version__, highdicom=highdicom.__version__)


def commit() -> dict:
    return common.commit("medaug/synth", "benchmarks/export.py", dirty_key="medaug_or_benchmark_uncommitted")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples per domain and case")
    parser.add_argument("--reference-samples", type=int, default=100, help="samples for the one-by-one references")
    parser.add_argument("--seg-samples", type=int, default=256, help="samples for the DICOM SEG cases (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case (after one warm-up)")
    parser.add_argument("--data", default=None, help="an existing prepared dataset with ct/abdomen and mr/prostate")
    parser.add_argument("--tmp", default=None, help="folder for the phantoms and the written files")
    parser.add_argument("--json-out", default=None, help="also write the JSON here")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names to run (default all; e.g. png,png_1_worker,nifti); "
                             "'pass' is null unless png, nifti and dicom all run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases.split(",")) - set(CASE_NAMES)) if args.cases else []
    if unknown:
        parser.error(f"unknown cases {unknown}; expected some of {', '.join(CASE_NAMES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="medaug-export-bench-") as workdir:
        result = run(args, Path(workdir))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
