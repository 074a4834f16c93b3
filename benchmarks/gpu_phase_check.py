"""GPU check of the phase-form kernels at full size (one short device call): channel_moments and
scale_shift_act reading a (256, 640, 129, 129) bf16 phase tensor in place (past 2³¹ elements) against the
same kernels on the interleaved map, and the d16 decoder at batch 64 with and without phase-form upsamples.
Prints one JSON object."""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from medaug.models import fused_decode as fd  # noqa: E402
from medaug.models.vqvae import FastDecoder  # noqa: E402


def main() -> None:
    start, result = time.perf_counter(), {}
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    y = torch.randn(256, 640, 129, 129, device=device, dtype=torch.bfloat16, generator=generator)
    y = y.contiguous(memory_format=torch.channels_last)
    result["phase_elements"] = y.numel()
    x = fd.interleave_phases(y)
    bias = torch.randn(160, device=device)
    _, mean_p, m2_p = fd.channel_moments(y, None, bias, phase=True)
    _, mean_x, m2_x = fd.channel_moments(x, None, bias)
    result["moments_equal"] = bool(torch.equal(mean_p, mean_x) and torch.equal(m2_p, m2_x))
    scale, shift = torch.rand(256, 160, device=device) + 0.5, torch.randn(256, 160, device=device)
    result["scale_shift_equal"] = bool(torch.equal(fd.scale_shift_act(y, scale, shift, phase=True),
                                                   fd.scale_shift_act(x, scale, shift)))
    del y, x
    torch.cuda.empty_cache()
    import sample  # noqa: E402  (benchmarks/sample.py: the random-weight d16 tokenizer)

    _, vqvae = sample.build_models("d16", device, False)
    f_hat = sample.random_features(vqvae, 64, device)
    image_a, logits_a = FastDecoder(vqvae).decode(f_hat)
    image_b, logits_b = FastDecoder(vqvae, phase_upsample=False).decode(f_hat)
    result["decoder_image_rel_diff"] = float((image_a - image_b).norm() / image_b.norm())
    result["decoder_label_agreement"] = float((logits_a.argmax(1) == logits_b.argmax(1)).float().mean())
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
