"""Benchmark (quality): first-draw target presence of trained phantom generators under several sampler settings.

``medaug synthesize`` draws a sample again when its mask misses its target (``--redraws``); this measures the
generator alone (``redraws=0``): for each generator run given (e.g. the ``medvar`` folders of a
``phantom_sweep.py`` round) and each setting in ``SETTINGS``, 192 samples over liver, prostate and
brain_tumor, and per target the fraction whose mask shows it on >= the generator's ``conditioning.min_pixels``
pixels (the manifest's ``adherent``).

    python benchmarks/presence_by_sampling.py /tmp/sweep/r5_sl1@*/medvar --json-out presence.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py)

SETTINGS = {"cfg1.5": {}, "t0.8": {"temperature": 0.8}, "topp0.8": {"top_p": 0.8}, "cfg0": {"cfg": 0.0},
            "cfg3": {"cfg": 3.0}}
TARGETS = ("liver", "prostate", "brain_tumor")


def first_draw_presence(generator: Path, sampling: dict, samples: int, work: Path) -> dict[str, float]:
    """Per target, the fraction of ``samples`` first draws whose mask shows it."""
    from medaug.synth.plan import PlanRequest, SamplingSettings
    from medaug.synth.run import ExportSettings, synthesize

    folder = work / "synthetic"
    shutil.rmtree(folder, ignore_errors=True)
    request = PlanRequest(n=samples, targets=TARGETS, batch_size=16, seed=0, redraws=0,
                          sampling=SamplingSettings(**sampling))
    summary = synthesize(generator, folder, request, ExportSettings(formats=(), montage=0), device="cpu").summary
    shutil.rmtree(folder, ignore_errors=True)
    return {target: entry["fraction"] for target, entry in summary["adherence"]["targets"].items()}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generators", nargs="+", type=Path, help="generator run folders (medaug train all --out)")
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as work:
        for generator in args.generators:
            for label, sampling in SETTINGS.items():
                results.setdefault(label, {})[generator.parent.name] = first_draw_presence(
                    generator, sampling, args.samples, Path(work))
    summary = {label: {target: {"values": [runs[name][target] for name in sorted(runs)],
                                "at_least_0.9": sum(runs[name][target] >= 0.9 for name in runs)}
                       for target in TARGETS} for label, runs in results.items()}
    common.report("presence_by_sampling", started, args.json_out, settings=SETTINGS, results=results, summary=summary)


if __name__ == "__main__":
    main()
