#!/usr/bin/env python
"""Sinkhorn backends against float64: time, peak memory and error of one setting.

    python benchmarks/gpu/sinkhorn_check.py --setting paper [--dry-run]

Settings (docs/DESIGN.md §9):
  paper  P = 21 problems (latent frames) × I = J = 1560 tokens × D = 16 channels, ε = the
         OTDLoss default (cost ½‖a − b‖²), 60 fixed iterations: one OTD call at 81×480×832.
  large  one problem, I = J = 32760 (the token count of a whole 81×480×832 clip), D = 64,
         ε = 0.005 × the mean cost (``benchmarks/bench_sinkhorn.py``'s small ε), 60 iterations.
  --dry-run: the same at tiny sizes on the CPU (paper 2 × 40 × 16, large 1 × 96 × 64); the
         Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1), where it is available.

Backends: ``triton`` and ``blocked`` on the GPU, ``sdpa`` (torch's CPU flash-attention kernel,
a CPU backend) on the CPU, and ``flash_sinkhorn`` (PyPI ``flash-sinkhorn``, alternating
updates, half cost, fixed ε and iterations, TF32 off) when it is installed. The reference is
the same solver in float64 (``backend='blocked'``, same iterations) on the same inputs.

Error columns: ``grad_rel`` = ‖G − G₆₄‖ / ‖G₆₄‖ of the envelope gradient
G_i = Σ_j T_ij (a_i − b_j) (what OTD uses, Eq. 13); ``pot`` = max |f̃ − f̃₆₄| / ε with f̃ = f −
mean(f) (potentials are defined up to a constant; for flash-sinkhorn, whose iteration
differs from ours, this is a comparison with our float64 iterate, not a pass criterion).
A backend passes when ``grad_rel`` ≤ 1e-3.
"""
import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, Timer, add_root_to_path, device_name, emit  # noqa: E402

add_root_to_path()
GRAD_TOL = 1e-3
SIZES = {
    'paper': dict(gpu=(21, 1560, 16), dry=(2, 40, 16)),
    'large': dict(gpu=(1, 32760, 64), dry=(1, 96, 64)),
}
ITERS = 60
SDPA_LARGE_ITERS = 10   # the CPU kernel at 32760²: 10 iterations measured, time scaled to 60


def otd_default_epsilon() -> float:
    from vdot_ext.losses.otd_loss import OTDLoss
    return float(inspect.signature(OTDLoss).parameters['epsilon'].default)


def make_inputs(setting: str, dry: bool, seed: int = 0):
    """Token clouds like OTD's: b is a = the fake score's tokens, b the teacher's (correlated)."""
    import torch
    p, n, d = SIZES[setting]['dry' if dry else 'gpu']
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    b = 0.7 * a[:, perm] + 0.7 * torch.randn(p, n, d, generator=g)
    if setting == 'paper':
        eps, eps_text = otd_default_epsilon(), f'{otd_default_epsilon():g} (OTDLoss default)'
    else:
        mean_cost = float(0.5 * (a.pow(2).sum(-1).mean() + b.pow(2).sum(-1).mean()
                                 - 2 * (a.mean(1) * b.mean(1)).sum(-1).mean()))
        eps, eps_text = 0.005 * mean_cost, f'{0.005 * mean_cost:.3g} (0.005 × mean cost)'
    return a, b, eps, f'{p}×{n}²×{d}', eps_text


def centred(f):
    return f - f.mean(dim=-1, keepdim=True)


def compare(result_f, result_g, grad, ref, eps):
    import torch
    pot = float((centred(result_f.double().cpu()) - centred(ref.f.double().cpu())).abs().max()) / eps
    if grad is None:
        return None, pot
    g64 = ref.gradient.double().cpu()
    rel = float(torch.linalg.vector_norm(grad.double().cpu() - g64) / torch.linalg.vector_norm(g64).clamp_min(1e-300))
    return rel, pot


def run_ours(backend, a, b, eps, iters, device):
    from vdot_ext.ot import sinkhorn
    a, b = a.to(device), b.to(device)
    sinkhorn(a, b, eps, num_iters=2, return_gradient=True, backend=backend)   # warm-up (Triton compiles)
    with PeakMemory(device) as peak, Timer(device) as timer:
        result = sinkhorn(a, b, eps, num_iters=iters, return_gradient=True, backend=backend)
    return result, timer.seconds, peak.bytes


def run_flash_sinkhorn(a, b, eps, iters, device):
    import torch
    from flash_sinkhorn import SamplesLoss
    loss = SamplesLoss('sinkhorn', backend='alternating', use_epsilon_scaling=False, eps=eps, n_iters=iters,
                       half_cost=True, potentials=True, debias=False, allow_tf32=False, last_extrapolation=False)
    a, b = a.to(device), b.to(device)
    loss(a, b)
    with PeakMemory(device) as peak, Timer(device) as timer:
        f, g = loss(a, b)
    return f.reshape(a.shape[0], -1), g.reshape(b.shape[0], -1), timer.seconds, peak.bytes, torch.__version__


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--setting', choices=sorted(SIZES), required=True)
    parser.add_argument('--dry-run', action='store_true')
    parser.add_argument('--backends', nargs='+', default=['triton', 'blocked', 'sdpa', 'flash_sinkhorn'])
    args = parser.parse_args(argv)
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dry = args.dry_run
    gpu = 'cuda' if torch.cuda.is_available() and not dry else 'cpu'
    if not dry and gpu == 'cpu':
        raise SystemExit('sinkhorn_check: no CUDA device (use --dry-run on a CPU machine)')
    a, b, eps, shape, eps_text = make_inputs(args.setting, dry)
    from vdot_ext.ot import sinkhorn
    references = {}

    def reference(iters, device):
        if iters not in references:
            references[iters] = sinkhorn(a.double().to(device), b.double().to(device), eps, num_iters=iters,
                                         return_gradient=True, backend='blocked', precision='float64')
        return references[iters]

    common = dict(check='sinkhorn', setting=args.setting, shape=shape, eps=eps_text)
    for backend in args.backends:
        row = dict(common, backend=backend)
        iters = ITERS
        try:
            if backend == 'flash_sinkhorn':
                try:
                    import flash_sinkhorn  # noqa: F401
                except ImportError:
                    emit(**row, status='skipped', note='flash-sinkhorn not installed (pip install flash-sinkhorn)')
                    continue
                if gpu != 'cuda':
                    emit(**row, status='skipped', note='flash-sinkhorn runs on CUDA only')
                    continue
                f, g, seconds, mem, _ = run_flash_sinkhorn(a, b, eps, iters, gpu)
                _, pot = compare(f, g, None, reference(iters, gpu), eps)
                emit(**row, device=device_name(gpu), seconds=seconds, iters=iters, peak_bytes=mem, pot_err=pot,
                     status='info', note='alternating updates, its own iteration: pot vs our float64 iterate')
                continue
            device = 'cpu' if backend == 'sdpa' else gpu
            if backend == 'triton' and device == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
                emit(**row, status='skipped', note='Triton needs CUDA (or TRITON_INTERPRET=1)')
                continue
            note = ''
            if backend == 'sdpa' and args.setting == 'large' and not dry:
                iters = SDPA_LARGE_ITERS
                note = f'CPU kernel; {iters} iterations measured, time ×{ITERS // iters}'
            result, seconds, mem = run_ours(backend, a, b, eps, iters, device)
            ref = reference(iters, gpu)
            rel, pot = compare(result.f, result.g, result.gradient, ref, eps)
            emit(**row, device=device_name(device), backend_ran=result.backend, iters=iters,
                 seconds=seconds * ITERS / iters, peak_bytes=mem, grad_rel_err=rel, pot_err=pot,
                 col_err=float(result.col_err.max()), status='ok' if rel <= GRAD_TOL else 'FAIL', note=note)
        except Exception as exc:  # one backend's failure is a row of the table, not the end of the check
            emit(**row, status='error', note=f'{type(exc).__name__}: {str(exc).splitlines()[0][:160]}')


if __name__ == '__main__':
    main()
