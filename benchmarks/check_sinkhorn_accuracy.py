#!/usr/bin/env python
"""Accuracy sweep: every float32 CPU backend of ``vdot_ext.ot.sinkhorn`` against the dense float64
reference (``sinkhorn_reference`` on the same float32-rounded inputs), over shapes, input scales,
ε and marginals.

Prints, per backend, the worst relative gradient error and the worst case where ``fused_cpu`` is
more than 10× (and above 1e-4) worse than ``sdpa``; exits 1 if any result is non-finite or such a
case exists.

A second sweep fixes ε in cost units (0.05 and 0.1 on ½‖a − b‖²) and scales the inputs by 1 … 1e6, where
float32 cannot resolve the scores (docs/DESIGN.md §9, Eq. 30): every backend must match the float64 reference
(gradient, and the reported column error must be the reference plan's), or flag ``precision_ok=False``.

    python benchmarks/check_sinkhorn_accuracy.py [--iters 20] [--threads 2] [--skip-relative]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import warnings

import torch

from vdot_ext.ot import sinkhorn, sinkhorn_reference

SHAPES = [(1, 1, 1, 1), (1, 1, 5, 2), (1, 5, 1, 2), (7, 3, 4, 1), (2, 33, 17, 2), (1, 200, 300, 128),
          (1, 64, 64, 256), (300, 5, 6, 4), (2, 1000, 999, 16), (1, 17, 2000, 3)]
SCALES = [1e-3, 1.0, 1e3]
EPS_REL = [1e-3, 1e-2, 0.1, 1.0]
BACKENDS = ['fused_cpu', 'sdpa', 'blocked']
MAGNITUDES = [1.0, 1e2, 1e3, 1e4, 1e6]
ABS_EPS = [0.05, 0.1]
MAG_SHAPES = [(2, 64, 64, 16), (1, 300, 200, 16), (3, 17, 40, 4)]


def _rel(x, y):
    return float((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-300))


def magnitude_sweep(iters):
    """Absolute ε, growing inputs: (markdown lines, number of failures)."""
    lines = ['| magnitude | ε | shape | backend ran | float64 | precision ok | gradient rel. err | '
             'reported col err | reference col err |', '|---|---|---|---|---|---|---|---|---|']
    failures = 0
    for (P, I, J, D), scale, eps in itertools.product(MAG_SHAPES, MAGNITUDES, ABS_EPS):
        gen = torch.Generator().manual_seed(P * I + J + D)
        a = (torch.randn(P, I, D, generator=gen, dtype=torch.float64) * scale).float()
        b = ((torch.randn(P, J, D, generator=gen, dtype=torch.float64) * 0.7 + 0.4) * scale).float()
        ref = sinkhorn_reference(a.double(), b.double(), eps, num_iters=iters, center=True)
        for name in BACKENDS:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                r = sinkhorn(a, b, eps, num_iters=iters, return_gradient=True, backend=name)
            err = _rel(r.gradient, ref.gradient)
            col_gap = float((r.col_err.double() - ref.col_err).abs().max())
            bad = not (err < 1e-3 and col_gap < 1e-3) and r.precision_ok
            failures += bad
            lines.append(f'| {scale:g} | {eps:g} | {(P, I, J, D)} | {r.backend} | {r.promoted} | {r.precision_ok} | '
                         f'{err:.1e} | {float(r.col_err.max()):.3g} | {float(ref.col_err.max()):.3g} |'
                         + (' **FAIL**' if bad else ''))
    return lines, failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--skip-relative', action='store_true', help='only the absolute-ε magnitude sweep')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mag_lines, mag_failures = magnitude_sweep(args.iters)
    print(f'Magnitude sweep: absolute ε, inputs × {MAGNITUDES}, {args.iters} iterations, vs the float64 reference:')
    print('\n'.join(mag_lines))
    if args.skip_relative:
        return 1 if mag_failures else 0
    worst = {name: (0.0, None) for name in BACKENDS}
    bad = []
    cases = 0
    for (P, I, J, D), scale, eps_rel, weighted in itertools.product(SHAPES, SCALES, EPS_REL, (False, True)):
        gen = torch.Generator().manual_seed(P * I + J + D)
        a = (torch.randn(P, I, D, generator=gen, dtype=torch.float64) * scale).float()
        b = ((torch.randn(P, J, D, generator=gen, dtype=torch.float64) * 0.7 + 0.5) * scale).float()
        kw = {}
        if weighted:
            kw = dict(a_weights=torch.rand(P, I, generator=gen, dtype=torch.float64) + 0.05,
                      b_weights=torch.rand(P, J, generator=gen, dtype=torch.float64) + 0.05)
        mean_cost = float(0.5 * torch.cdist(a.double(), b.double()).square().mean())
        eps = eps_rel * max(mean_cost, 1e-30)
        ref = sinkhorn_reference(a.double(), b.double(), eps, num_iters=args.iters, center=True, **kw)
        errs = {}
        for name in BACKENDS:
            r = sinkhorn(a, b, eps, num_iters=args.iters, return_gradient=True, backend=name, **kw)
            finite = all(bool(torch.isfinite(t).all()) for t in (r.f, r.g, r.gradient, r.row_err, r.col_err))
            errs[name] = _rel(r.gradient, ref.gradient) if finite else float('inf')
            case = (P, I, J, D, scale, eps_rel, weighted)
            if errs[name] > worst[name][0]:
                worst[name] = (errs[name], case)
        if errs['fused_cpu'] > max(10 * errs['sdpa'], 1e-4):
            bad.append((case, errs))
        cases += 1
    print(f'{cases} cases ({len(SHAPES)} shapes × scales {SCALES} × ε/mean {EPS_REL} × uniform/given weights), '
          f'{args.iters} iterations, gradient relative to the float64 reference:')
    print('| backend | worst relative gradient error | at (P, I, J, D, scale, ε/mean, weighted) |')
    print('|---|---|---|')
    for name, (err, case) in worst.items():
        print(f'| {name} | {err:.2e} | {case} |')
    for case, errs in bad:
        print('fused_cpu much worse than sdpa at', case, errs)
    return 1 if bad or mag_failures or any(err == float('inf') for err, _ in worst.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
