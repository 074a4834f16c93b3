"""The synthesis engine: a loaded generator that turns planned samples into labelled slices.

:class:`SynthGenerator` wraps a trained generator run (``medaug train var``/``all``): the transformer, its
tokenizer, the condition bank, the domains and the structure table. :meth:`SynthGenerator.generate` samples
a batch of :class:`~medaug.synth.plan.PlannedSample` (each with its own seed, so a sample depends on its
seed and condition only) and decodes image channels plus mask. The mask is the argmax over background and
the sample's annotated structures (the structures its condition says the source labels; every structure for
unconditional samples), as the tokenizer's evaluation decodes, then mapped to vocabulary ids.

Precision: float32 on the CPU; on CUDA bf16 by default (``dtype="bfloat16"``: the fast path's bf16 weights, or
autocast on the basic path), float32 on request.
The manifest records both, with the device and the batch composition (DESIGN §3): :func:`regenerate` re-runs
a manifest row's whole batch with those settings, which reproduces the row exactly on the same machine and
software (a batch of a different size may round differently in float matmuls).

Export geometry and units (no real position exists for a synthetic slice): the domain's in-plane spacing,
its slicing plane (``auto`` → axial) and :func:`~medaug.synth.export.canonical_affine`; CT channels return
to HU through the domain's window, MR channels to a fixed arbitrary-unit scale (model -1 → 0, +1 → 1000 a.u.,
``medaug.synth.layout.MR_EXPORT_RANGE``), since MR intensities are normalized per volume and have no
absolute scale to return to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaug.data.structures import StructureTable
from medaug.errors import ConfigError
from medaug.synth.layout import MR_EXPORT_RANGE
from medaug.synth.plan import PlannedSample, SamplingSettings
from medaug.train.condition_bank import ConditionBank

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")


@dataclass
class GeneratedBatch:
    """``image_BCHW`` float32 model space (B, C_max, H, W); ``label_BHW`` uint8 vocabulary ids;
    ``present``: per sample, the vocabulary names with >= 1 pixel, and ``pixels`` their counts."""

    image_BCHW: np.ndarray
    label_BHW: np.ndarray
    present: list[list[str]]
    pixels: list[list[int]]


@dataclass
class PendingBatch:
    """A batch queued on the device by :meth:`SynthGenerator.submit`; :meth:`result` waits for it."""

    _finish: Callable[[], GeneratedBatch]

    def result(self) -> GeneratedBatch:
        return self._finish()


DECODER_COMPILE_MIN_SAMPLES = 50_000
"""Samples from which the fast path compiles its decoder. On the H200 at batch 256 the compiled decoder makes
~970 images/s and the eager one (bf16, NCHW) 501, 0.97 ms less per image, but compiling costs 50-60 s in a
fresh process: it pays from ~55,000 images (``benchmarks/results/sample-h200-session6.json``). Since the fused
decode path (session 8, uncompiled, as fast as the compiled one) decodes chunks of 32 images or more, a
planned run compiles nothing by default where that path is the default (its last chunk alone would pay the
minute); an endless stream (``GeneratorDataset``) still compiles the small-chunk path."""
LEGACY_DECODER = {"compiled": True, "channel_stats_norm": False, "gemm_attention": False, "fused_norm": False,
                  "padded_output": False, "phase_upsample": False, "padded_rows": False}
"""The fast path's decoder in runs whose synthesize.json records none (made before the record existed); a
record without a key (``gemm_attention``, ``fused_norm``, ``padded_output``, ``phase_upsample``,
``padded_rows``: runs made before it was recorded) takes the key's value here."""
LEGACY_SAMPLER = {"fused_qkv": False}
"""The fast path's sampler in runs whose synthesize.json records none: the compiled q/k normalisation (the
Triton one of :mod:`medaug.models.fused_sample` rounds differently in bf16)."""


class SynthGenerator:
    """A trained generator, ready to sample (module docstring).

    ``run``: a VAR run folder or one of its checkpoint folders. ``device``: ``cpu``, ``cuda``, ``cuda:1``...
    ``dtype``: "float32" or "bfloat16" (autocast of sampling and decoding; bf16 only on CUDA by default).
    ``weights``: "auto" (EMA when present), "ema" or "model". ``compile_decoder``: whether the fast path on
    CUDA compiles its decoder; None (default) compiles it when :attr:`expected_samples` is unknown (a
    dataset drawing epoch after epoch) or at least :data:`DECODER_COMPILE_MIN_SAMPLES` (``medaug synthesize``
    sets it to the run's planned samples). :meth:`decoder_record` is what a run records and
    :meth:`adopt_decoder` what a resumed run or ``regenerate`` takes back, so their batches decode as the
    run's first ones did.
    """

    def __init__(self, run: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                 weights: str = "auto", fast: bool | None = None, compile_decoder: bool | None = None):
        from medaug.train.var_task import load_generator

        self.device = torch.device(device)
        self.dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if self.dtype not in DTYPES:
            raise ConfigError("--dtype", f"is {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        self.var, self.vqvae, self.meta = load_generator(run, self.device, weights)
        self.bank = ConditionBank.from_json(self.meta["condition_bank"])
        self.table = StructureTable.from_records(self.meta["structure_table"])
        self.domains: dict[str, Any] = self.meta["domains"]
        self.domain_names: tuple[str, ...] = tuple(self.meta["domain_names"])
        self.checkpoint = Path(self.meta["loaded_weights"]["checkpoint"])
        self.sha256: str = self.meta["loaded_weights"]["sha256"]
        self.size = int(self.meta["image_size"])
        self._lut = self.table.local_to_vocab_lut()
        # the fast path (bf16 weights, compiled steps, CUDA graphs) is the bf16 path on a GPU
        self.fast = (self.device.type == "cuda" and self.dtype == "bfloat16") if fast is None else fast
        self.compile_decoder = compile_decoder
        self.expected_samples: int | None = None
        self._adopted_decoder: dict[str, bool] | None = None
        self._adopted_sampler: dict[str, bool] | None = None
        self._fast_sampler: Any = None
        self._fast_decoder: Any = None
        self._decode_stream: Any = None

    @property
    def queues_on_device(self) -> bool:
        """Whether :meth:`submit` returns before the device has finished (the fast path on CUDA)."""
        return self.fast_on_cuda

    @property
    def fast_on_cuda(self) -> bool:
        """Whether batches run through FastSampler + FastDecoder on a GPU (whose settings a run records)."""
        return self.fast and self.device.type == "cuda"

    @property
    def shown_min_pixels(self) -> int:
        """Pixels from which a generated mask shows a structure: the generator's ``conditioning.min_pixels``
        (a structure counted as present in its training conditions from there on; 1 for older runs)."""
        return int(((self.meta.get("recipe") or {}).get("conditioning") or {}).get("min_pixels", 1))

    @property
    def run_dir(self) -> Path:
        """The run folder (the checkpoint's grandparent: ``RUN/checkpoints/step_N``)."""
        return self.checkpoint.parents[1]

    @property
    def device_label(self) -> str:
        """``cpu`` or ``cuda (<GPU name>)``, for the manifest."""
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return self.device.type

    def reconstruction_quality(self) -> dict[str, float | None]:
        """Tokenizer reconstruction Dice per structure name (None where never measured)."""
        import json

        tokenizer_meta = self.run_dir / self.meta["tokenizer"]["path"] / "meta.json"
        records = json.loads(tokenizer_meta.read_text()).get("structure_table", [])
        return {r["name"]: (r.get("reconstruction") or {}).get("dice") for r in records}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def condition_tensors(self, samples: Sequence[PlannedSample]) -> tuple[torch.Tensor, ...]:
        """(domain_B, present_BS, annotated_BS, drop_B, decode_BS) on the CPU; ``decode_BS`` is the set the
        mask argmax runs over (the annotated set; everything for unconditional samples)."""
        size = (len(samples), self.table.num_structures)
        present_BS, annotated_BS = torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)
        for b, sample in enumerate(samples):
            present_BS[b, [s - 1 for s in sample.present]] = True
            annotated_BS[b, [s - 1 for s in sample.annotated]] = True
        domain_B = torch.tensor([s.domain_index for s in samples], dtype=torch.long)
        drop_B = torch.tensor([s.unconditional for s in samples], dtype=torch.bool)
        decode_BS = annotated_BS | drop_B[:, None]
        return domain_B, present_BS, annotated_BS, drop_B, decode_BS

    @torch.no_grad()
    def generate(self, samples: Sequence[PlannedSample], settings: SamplingSettings) -> GeneratedBatch:
        """Sample and decode ``samples`` as one batch (module docstring): :meth:`submit`, then its result."""
        return self.submit(samples, settings).result()

    @torch.no_grad()
    def submit(self, samples: Sequence[PlannedSample], settings: SamplingSettings) -> PendingBatch:
        """Queue ``samples`` as one batch on the device; :meth:`PendingBatch.result` waits for it.

        With ``fast`` (default on a GPU in bf16) the batch runs through
        :class:`~medaug.models.sampling.FastSampler` and :class:`~medaug.models.vqvae.FastDecoder` (bf16
        weights, compiled per-scale steps, CUDA graphs); unconditional samples, which that path does not
        take, and the CPU use the basic sampler (on the CPU both give the same tokens, tested). On CUDA the
        decode and the copy to pinned host memory run on a second stream that waits for the tokens, and
        nothing here waits for the device: a caller that submits batch b + 1 before taking batch b's result
        (as :func:`medaug.synth.run.generate_batches` does) has b's decode overlap b + 1's sampling, and the
        host's per-sample work overlap both. Each stream runs the kernels one batch at a time would, in the same
        order and at the same shapes (the decoder's chunk size is fixed, not read from free memory), so a
        batch's result does not depend on what ran beside it.
        """
        from medaug.models.sampling import generators_from_seeds

        domain_B, present_BS, annotated_BS, drop_B, decode_BS = self.condition_tensors(samples)
        device = self.device
        generators = generators_from_seeds([s.seed for s in samples], device)
        if not self.fast or bool(drop_B.any()):
            done = self._host_batch(*self._basic(domain_B, present_BS, annotated_BS, drop_B, decode_BS, generators,
                                                 settings))
            return PendingBatch(lambda: done)
        sampler, decoder = self._fast_path()
        indices = sampler.sample_tokens(domain_B.to(device), present_BS.to(device), annotated_BS.to(device),
                                        generators=generators, cfg=settings.cfg, top_k=settings.top_k,
                                        top_p=settings.top_p, temperature=settings.temperature)
        if device.type != "cuda":
            image_BCHW, label_BHW = decoder.indices_to_img(self.vqvae.quantizer, indices, decode_BS.to(device))
            done = self._host_batch(image_BCHW, label_BHW)
            return PendingBatch(lambda: done)
        image_BCHW, label_BHW, event = self._decode_behind(decoder, indices, decode_BS)
        return PendingBatch(lambda: (event.synchronize(), self._host_batch(image_BCHW, label_BHW))[1])

    def _decode_behind(self, decoder: Any, indices: list[torch.Tensor], decode_BS: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return decode_behind(decoder, self.vqvae.quantizer, indices, decode_BS, self._decode_stream)

    def _host_batch(self, image_BCHW: torch.Tensor, label_BHW: torch.Tensor) -> GeneratedBatch:
        """The :class:`GeneratedBatch` of a decoded image and model-local label (on any device)."""
        label_BHW = self._lut[label_BHW.cpu().numpy().clip(0, 255)]
        image_BCHW = image_BCHW.float().clamp(-1.0, 1.0).cpu().numpy()
        present, pixels = _present_structures(label_BHW)
        return GeneratedBatch(np.ascontiguousarray(image_BCHW), np.ascontiguousarray(label_BHW), present, pixels)

    def _basic(self, domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor,
               drop_B: torch.Tensor, decode_BS: torch.Tensor, generators: list[torch.Generator],
               settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """The basic sampler + ``VQVAE.decode`` (under autocast when bf16): image, model-local label."""
        from medaug.models.sampling import sample_tokens
        from medaug.train.tokenizer_eval import annotated_argmax

        device = self.device
        with self.autocast():
            indices = sample_tokens(self.var, self.vqvae.quantizer, domain_B.to(device), present_BS.to(device),
                                    annotated_BS.to(device), generators=generators, cfg=settings.cfg,
                                    top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature,
                                    drop_B=drop_B.to(device))
            image_BCHW, logits_BKHW = self.vqvae.decode(self.vqvae.quantizer.indices_to_features(indices))
        return image_BCHW, annotated_argmax(logits_BKHW.float().cpu(), decode_BS)

    def _fast_path(self) -> tuple[Any, Any]:
        """The fast sampler and decoder of this generator, built on first use (compiles on CUDA)."""
        from medaug.models.sampling import FastSampler
        from medaug.models.vqvae import FastDecoder

        if self._fast_sampler is None:
            fused_qkv = (self.sampler_record() or {}).get("fused_qkv")
            self._fast_sampler = FastSampler(self.var, self.vqvae.quantizer, fused_kernels=fused_qkv)
        if self._fast_decoder is None:
            options = self.decoder_record() or {}
            self._fast_decoder = FastDecoder(self.vqvae, compile=options.get("compiled"),
                                             channel_stats_norm=options.get("channel_stats_norm"),
                                             gemm_attention=options.get("gemm_attention", True),
                                             fused_norm=options.get("fused_norm", False),
                                             padded_output=options.get("padded_output", False),
                                             phase_upsample=options.get("phase_upsample", False),
                                             padded_rows=options.get("padded_rows", False))
        return self._fast_sampler, self._fast_decoder

    def decoder_record(self) -> dict[str, bool] | None:
        """The fast path's decoder settings on CUDA, {"compiled", "channel_stats_norm", "gemm_attention",
        "fused_norm", "padded_output", "phase_upsample", "padded_rows"} (class docstring; ``padded_output``: the
        fused path's output conv runs zero-padded to 32 channels; ``phase_upsample``: its upsamples into blocks
        of equal width run in phase form; ``padded_rows``: its chunks are padded to a multiple of 32 rows); None
        where they do not apply (the CPU, where the decoder is exact, or
        the basic path). New runs decode chunks of 32 images or more through the fused (uncompiled) path where it
        is the default (:func:`~medaug.models.fused_decode.fused_default`); ``compiled`` then only concerns
        smaller chunks."""
        from medaug.models.fused_decode import fused_default

        if not self.fast_on_cuda:
            return None
        if self._fast_decoder is not None:  # every recorded key is one of the decoder's attributes
            return {key: getattr(self._fast_decoder, key) for key in LEGACY_DECODER}
        if self._adopted_decoder is not None:
            return dict(self._adopted_decoder)
        fused = fused_default(self.device)
        compiled = self.compile_decoder
        if compiled is None:  # with the fused path a planned run's compile would only serve its last chunk
            large = self.expected_samples is not None and self.expected_samples >= DECODER_COMPILE_MIN_SAMPLES
            compiled = self.expected_samples is None or (large and not fused)
        return {"compiled": compiled, "channel_stats_norm": compiled and not fused, "gemm_attention": True,
                "fused_norm": fused, "padded_output": fused, "phase_upsample": fused, "padded_rows": fused}

    def adopt_decoder(self, record: dict[str, Any] | None) -> None:
        """Decode as a run recorded (:meth:`decoder_record`; None: a run from before the record, which decoded
        as :data:`LEGACY_DECODER`). Nothing changes where the record does not apply."""
        if not self.fast_on_cuda:
            return
        adopted = _recorded(record, LEGACY_DECODER)
        if self._fast_decoder is not None and self.decoder_record() != adopted:
            self._fast_decoder = None  # built with other settings: rebuilt on next use
        self._adopted_decoder = adopted

    def sampler_record(self) -> dict[str, bool] | None:
        """The fast path's sampler settings on CUDA, {"fused_qkv"}: whether the q/k normalisation runs as the
        Triton kernel (the default where the fused decoder is); None where they do not apply."""
        from medaug.models.fused_decode import fused_default

        if not self.fast_on_cuda:
            return None
        if self._fast_sampler is not None:
            return {"fused_qkv": self._fast_sampler.fused_kernels}
        if self._adopted_sampler is not None:
            return dict(self._adopted_sampler)
        return {"fused_qkv": fused_default(self.device)}

    def adopt_sampler(self, record: dict[str, Any] | None) -> None:
        """Sample as a run recorded (:meth:`sampler_record`; None: a run from before the record, which sampled
        as :data:`LEGACY_SAMPLER`). Nothing changes where the record does not apply."""
        if not self.fast_on_cuda:
            return
        adopted = _recorded(record, LEGACY_SAMPLER)
        if self._fast_sampler is not None and self.sampler_record() != adopted:
            self._fast_sampler = None  # built with other settings: rebuilt on next use
        self._adopted_sampler = adopted


def _recorded(record: dict[str, Any] | None, legacy: dict[str, bool]) -> dict[str, bool]:
    """A run's recorded settings, each key it lacks (recorded before the key existed) at its ``legacy`` value."""
    return {key: bool((record or {}).get(key, value)) for key, value in legacy.items()}


def decode_behind(decoder: Any, quantizer: Any, indices: list[torch.Tensor], decode_BS: torch.Tensor,
                  stream: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Decode token maps on CUDA ``stream`` once the current stream has made them, without waiting for it.

    ``decoder``: a :class:`~medaug.models.vqvae.FastDecoder`; ``indices``: per-scale token maps made on the
    current stream; ``decode_BS``: the structures the mask argmax runs over. Returns (image (B, C, H, W)
    float32 in [-1, 1], label (B, H, W) uint8 model-local, both in pinned host memory, and the CUDA event
    after which they hold the result).
    """
    device = indices[0].device
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        decode_BS = decode_BS.to(device, non_blocking=True)
        image_BCHW, label_BHW = decoder.indices_to_img(quantizer, indices, decode_BS)
        image_host = torch.empty(image_BCHW.shape, dtype=torch.float32, pin_memory=True)
        label_host = torch.empty(label_BHW.shape, dtype=torch.uint8, pin_memory=True)
        image_host.copy_(image_BCHW, non_blocking=True)
        label_host.copy_(label_BHW.clamp(0, 255).to(torch.uint8), non_blocking=True)
        event = stream.record_event()
    # inputs made on the current stream and read on this one must not be reused before it has read them
    # (the caller may drop them, and its next batch allocate their memory, while this stream still runs)
    for tensor in (*indices, decode_BS):
        tensor.record_stream(stream)
    return image_host, label_host, event


def _present_structures(label_BHW: np.ndarray) -> tuple[list[list[str]], list[list[int]]]:
    """Per sample, vocabulary names with >= 1 pixel (in id order) and their pixel counts."""
    from medaug import vocab

    present, pixels = [], []
    for label_HW in label_BHW:
        counts = np.bincount(label_HW.ravel(), minlength=256)
        ids = [i for i in np.flatnonzero(counts) if i not in (vocab.BACKGROUND, vocab.IGNORE)]
        present.append([vocab.by_id(int(i)).name for i in ids])
        pixels.append([int(counts[i]) for i in ids])
    return present, pixels


def export_intensity(domain: dict[str, Any]) -> list[dict[str, Any]]:
    """Per channel of ``domain`` (domains.json record), the model → source mapping exports use."""
    from medaug.prepare.intensity import IntensityMapping

    mappings = []
    for channel in domain["channels"]:
        spec = domain["intensity"][channel]
        if domain["modality"].lower() == "ct":
            low, high = spec["window_hu"]
            mappings.append(IntensityMapping("ct_window", float(low), float(high), "HU").to_dict())
        else:
            percentiles = tuple(spec["percentiles"]) if spec.get("percentiles") else None
            mappings.append(IntensityMapping("mr_percentile", *MR_EXPORT_RANGE, "a.u.", percentiles).to_dict())
    return mappings


def domain_plane(domain: dict[str, Any]) -> str:
    """The domain's slicing plane; ``auto`` (the acquisition plane, varying per volume) exports as axial."""
    plane = domain.get("plane", "auto")
    return "axial" if plane == "auto" else plane


def export_affine(domain: dict[str, Any], size: int) -> np.ndarray:
    """(4, 4) pixel → RAS mm affine of a synthetic slice of ``domain`` (canonical, centred at the origin)."""
    from medaug.synth.export.base import canonical_affine

    spacing = float(domain["spacing_mm"])
    return canonical_affine(spacing, size, domain_plane(domain), slice_thickness_mm=spacing)


__all__ = ["DECODER_COMPILE_MIN_SAMPLES", "DTYPES", "LEGACY_DECODER", "LEGACY_SAMPLER", "GeneratedBatch", "PendingBatch", "SynthGenerator",
           "decode_behind", "domain_plane", "export_affine", "export_intensity"]
