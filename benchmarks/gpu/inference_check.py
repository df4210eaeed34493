#!/usr/bin/env python
"""4-step inference at 81×480×832 on the 1.3B VACE size: seconds and peak memory.

    python benchmarks/gpu/inference_check.py [--dry-run]

The pipeline of ``python -m vdot_ext.tools.infer`` after its inputs are read
(:mod:`vdot_ext.apis.inference`), with random weights: the VCU (frames, mask) encoded by a
full-width Wan VAE (``encode_vcu``), the 4-step sampler with the training schedule and
fresh-noise re-noising (``sample_student``) on a bf16 VACE-Wan2.1-1.3B, and the VAE decode
of the 21 latent frames. The text encoder is not run (a random 512 × 4096 context: the
umT5-xxl encoder is one forward pass per prompt, independent of the student).
--dry-run: the tiny VACE preset, a small Wan VAE, 5×64×64, fp32, on the CPU.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, Timer, add_root_to_path, device_name, emit  # noqa: E402

add_root_to_path()


def build(dry: bool, device: str):
    import torch
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    from vdot_ext.models.wan_vace_score import WanVACEScore
    preset, dtype = ('tiny-vace', torch.float32) if dry else ('wan2.1-vace-1.3b', torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanVACEScore(preset, dtype=dtype).eval().requires_grad_(False)
        if dry:
            with skip_model_initialization():
                vae = WanVideoVAE(z_dim=16)
            vae.model = VideoVAE_(dim=8, z_dim=16, num_res_blocks=1)
        else:
            vae = WanVideoVAE(z_dim=16)
    vae.model.to(device).eval().requires_grad_(False)
    for p in vae.model.parameters():   # random weights: keep activations in range
        p.data.mul_(0.5)
    return model, vae


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry-run', action='store_true')
    args = parser.parse_args(argv)
    import torch
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit('inference_check: no CUDA device (use --dry-run on a CPU machine)')
    device = 'cpu' if dry else 'cuda'
    frames, height, width, text = (5, 64, 64, (8, 32)) if dry else (81, 480, 832, (512, 4096))
    row = dict(check='inference', setting=f'{"tiny-vace fp32" if dry else "1.3B VACE bf16"} '
                                          f'{frames}×{height}×{width}, 4 steps')
    try:
        from vdot_ext.apis.inference import initial_noise, sample_student, sampling_timesteps
        from vdot_ext.patches.vcu import encode_vcu
        model, vae = build(dry, device)
        g = torch.Generator().manual_seed(1)
        context = torch.randn(1, *text, generator=g).to(device)
        video = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device)
        mask = torch.zeros(1, 1, frames, height, width, device=device)
        mask[..., height // 4:3 * height // 4, width // 4:3 * width // 4] = 1
        timesteps = sampling_timesteps(4)
        shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)

        def run():
            noise, gen = initial_noise(shape, 2025)
            with Timer(device) as t_vcu:
                vace = encode_vcu(vae, video * (1 - mask), mask)
            with Timer(device) as t_dit:
                x0 = sample_student(model, context, vace, noise, timesteps,
                                    lambda i: torch.randn(shape, generator=gen))
            with Timer(device) as t_dec:
                out = vae.decode(x0, device=device)
            return t_vcu.seconds, t_dit.seconds, t_dec.seconds, out
        with torch.no_grad():
            if not dry:
                run()       # warm-up: kernels, allocator
            with PeakMemory(device) as peak:
                vcu_s, dit_s, dec_s, out = run()
        finite = bool(torch.isfinite(out).all())
    except Exception as exc:
        emit(**row, status='error', note=f'{type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
        return
    emit(**row, device=device_name(device), seconds=dit_s, total_seconds=vcu_s + dit_s + dec_s,
         peak_bytes=peak.bytes, status='ok' if finite else 'FAIL',
         note=f'sampling {dit_s:.2f}s (4 DiT passes); VCU encode {vcu_s:.2f}s, decode {dec_s:.2f}s'
              + ('' if finite else '; non-finite output'))


if __name__ == '__main__':
    main()
