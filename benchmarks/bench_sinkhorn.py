#!/usr/bin/env python
"""Sinkhorn / OTD benchmark: vdot_ext.ot vs the public-VDOT pattern, POT, ott-jax and geomloss.

Every (method, problem) runs in its own subprocess, so that its peak extra memory can be read
from the kernel: after imports, input creation and a warm-up, the worker resets the peak-RSS
counter (``echo 5 > /proc/self/clear_refs``), reads VmRSS as the baseline, runs the method once
(timed, wall clock) and reports ``VmHWM − baseline``. JAX methods are compiled for the exact
shapes before timing (compile time excluded). Marginal errors are recomputed afterwards in
float64 from each method's output (plan, or potentials streamed block by block).

Suites (ε in units of the cost ½‖a − b‖², docs/DESIGN.md §9; 0.05 = the public code's 0.1 on ‖a − b‖²):
  paper  21 frames × 1560 tokens × 16 ch, ε = 0.05, 60 iterations, the whole OTD gradient
         (pooling, solver, envelope gradient, adjoint, normalisation: ``OTDLoss.ot_gradient``),
         plus tolerance mode (column error ≤ 1e-3) and the public-VDOT pattern (per-frame loop,
         materialised cost, autograd through 60 unrolled iterations) on --public-frames frames,
         extrapolated linearly to 21 frames (time and memory: its graphs live until backward).
  large  I = J ∈ --sizes, D = 64, ε ∈ --eps-rel × mean cost, 30 iterations, solve only.
  convergence  (in process) fixed iterations vs tolerance mode at --paper-eps on two separated clusters
         (50/50 vs 80/20 mass, 1560 tokens × 16 ch) and on latent-like token clouds: iterations, time, true
         column error, and the error of the normalised OT step (what OTDLoss applies) against a tol-1e-4 solve.
  periter  (in process) tolerance-mode wall time per iteration at --periter-iters iteration counts on a tiny
         unconverging problem: constant if nothing grows with the iteration count.

Optional dependencies (benchmark only): ``pip install pot geomloss "jax[cpu]==0.8.*" ott-jax==0.6.0``.
A missing one is reported as skipped with the reason, never silently.

Examples:
  python benchmarks/bench_sinkhorn.py --suite paper --jsonl /tmp/sk.jsonl
  python benchmarks/bench_sinkhorn.py --suite large --sizes 4096 16384 --jsonl /tmp/sk.jsonl
  python benchmarks/bench_sinkhorn.py --render /tmp/sk.jsonl --results benchmarks/RESULTS.md
  python benchmarks/bench_sinkhorn.py --suite convergence --threads 2
  python benchmarks/bench_sinkhorn.py --suite periter --periter-iters 1000 8000 --threads 1
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = '## Sinkhorn (OTD)'

LARGE_METHODS = ['ours_fused', 'ours_sdpa', 'ours_blocked', 'pot_sinkhorn_log', 'ott_dense', 'ott_online',
                 'geomloss_tensorized']
PAPER_METHODS = ['ours_fused', 'ours_sdpa', 'ours_blocked', 'ours_fused_tol', 'ours_fused_tol_plain',
                 'ours_fused_tol_scaling', 'public_vdot']
# our variants: method → (backend, tolerance mode?, over-relaxation, ε-scaling?)
OURS = {
    'ours_fused': ('fused_cpu', False, None, False),
    'ours_sdpa': ('sdpa', False, None, False),
    'ours_blocked': ('blocked', False, None, False),
    'ours_fused_tol': ('fused_cpu', True, 'auto', False),
    'ours_fused_tol_plain': ('fused_cpu', True, None, False),
    'ours_fused_tol_scaling': ('fused_cpu', True, None, True),
}
BASELINE = 'ours_fused'     # what backend='auto' runs on CPU: the ratios are against it
METHOD_LABEL = {
    'ours_fused': 'vdot_ext (fused_cpu, fixed iters)',
    'ours_sdpa': 'vdot_ext (sdpa, fixed iters)',
    'ours_blocked': 'vdot_ext (blocked addmm, fixed iters)',
    'ours_fused_tol': 'vdot_ext (fused_cpu, tol 1e-3, auto over-relaxation)',
    'ours_fused_tol_plain': 'vdot_ext (fused_cpu, tol 1e-3, plain)',
    'ours_fused_tol_scaling': 'vdot_ext (fused_cpu, tol 1e-3, ε-scaling, plain)',
    'public_vdot': 'public-VDOT pattern (autograd, per frame, dense)',
    'pot_sinkhorn_log': "POT ot.sinkhorn 'sinkhorn_log' (torch)",
    'ott_dense': 'ott-jax PointCloud dense',
    'ott_online': 'ott-jax PointCloud online (batch 1024)',
    'geomloss_tensorized': 'geomloss tensorized (sinkhorn_loop, fixed ε)',
}
# dense competitors hold I×J float32 matrices (several): skip them where that alone exceeds RAM budget
DENSE_LIMIT_BYTES = 6 * 2 ** 30


# ----------------------------------------------------------------------------- measurement helpers
def _status_kb(key):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{key} not in /proc/self/status')


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: clear_refs 5)."""
    with open('/proc/self/clear_refs', 'w') as fh:
        fh.write('5')


def _make_inputs(spec):
    import torch
    gen = torch.Generator().manual_seed(spec['seed'])
    if spec['suite'] == 'paper':
        # tokens at pooled resolution with unit variance, nearest-upsampled to latents so that 2×2
        # pooling returns them exactly; real = 0.7·fake(shuffled) + 0.7·noise (correlated predictions)
        F, h, w, C, k = spec['frames'], spec['h'], spec['w'], 16, 2
        fake_tok = torch.randn(1, C, F, h, w, generator=gen)
        perm = torch.randperm(h * w, generator=gen)
        shuffled = fake_tok.flatten(3)[..., perm].reshape(1, C, F, h, w)
        real_tok = 0.7 * shuffled + 0.7 * torch.randn(1, C, F, h, w, generator=gen)
        up = lambda t: t.repeat_interleave(k, 3).repeat_interleave(k, 4)   # noqa: E731
        return up(fake_tok).contiguous(), up(real_tok).contiguous()
    n, d = spec['n'], spec['d']
    a = torch.randn(1, n, d, generator=gen)
    b = torch.randn(1, n, d, generator=gen) * 0.8 + 0.3
    return a, b


def _mean_cost(a, b):
    """Mean of ½‖a_i − b_j‖² over all pairs, exactly: ½(E‖a‖² + E‖b‖²) − ā·b̄ (float64)."""
    a, b = a.double(), b.double()
    return float(0.5 * a.square().sum(-1).mean() + 0.5 * b.square().sum(-1).mean()
                 - (a.mean(-2) * b.mean(-2)).sum(-1).mean())


def _errors_from_potentials(a, b, f, g, eps, absorbed=False, block=2048):
    """L1 marginal errors (max over problems) of T = u μ exp((f + g − C)/ε), float64, streamed.

    ``absorbed``: ott-jax convention T = exp((f + g − C)/ε) (log-weights inside f, g).
    """
    import torch
    a, b, f, g = a.double(), b.double(), f.double(), g.double()
    P, I, _ = a.shape
    J = b.shape[1]
    lw = 0.0 if absorbed else -math.log(I) - math.log(J)
    rows = torch.zeros(P, I, dtype=torch.float64)
    cols = torch.zeros(P, J, dtype=torch.float64)
    for p in range(P):
        for i0 in range(0, I, block):
            cost = 0.5 * torch.cdist(a[p, i0:i0 + block], b[p]).square()
            t = torch.exp(lw + (f[p, i0:i0 + block, None] + g[p, None, :] - cost) / eps)
            rows[p, i0:i0 + block] = t.sum(1)
            cols[p] += t.sum(0)
    return float((rows - 1.0 / I).abs().sum(1).max()), float((cols - 1.0 / J).abs().sum(1).max())


def _errors_from_plans(plans):
    """plans: list of [I, J] tensors; max L1 errors, float64 sums."""
    import torch
    re, ce = 0.0, 0.0
    for t in plans:
        I, J = t.shape
        re = max(re, float((t.sum(1, dtype=torch.float64) - 1.0 / I).abs().sum()))
        ce = max(ce, float((t.sum(0, dtype=torch.float64) - 1.0 / J).abs().sum()))
    return re, ce


# ----------------------------------------------------------------------------- methods
def _run_ours(spec, a, b, eps, backend, tol=None, overrelaxation='auto', eps_scaling=None):
    from vdot_ext.ot import sinkhorn
    kw = (dict(tol=tol, max_iters=5000, eps_scaling=eps_scaling) if tol is not None
          else dict(num_iters=spec['iters']))
    if spec['suite'] == 'paper':
        from vdot_ext.losses.otd_loss import OTDLoss, frames_to_tokens
        loss = OTDLoss(epsilon=eps, num_iters=spec['iters'], tol=tol, max_iters=5000,
                       overrelaxation=overrelaxation, backend=backend, eps_scaling=eps_scaling)

        def run():
            return loss.ot_gradient(a, b), dict(loss.last_stats)

        def warm():
            OTDLoss(epsilon=eps, num_iters=2, backend=backend).ot_gradient(a[:, :, :1, :8, :8], b[:, :, :1, :8, :8])

        def evaluate(out):
            # OTDLoss returns the gradient only: for the float64 error check the same (deterministic)
            # solve is repeated outside the timed region to get its potentials
            ta, tb = frames_to_tokens(a, 2), frames_to_tokens(b, 2)
            r = sinkhorn(ta, tb, eps, backend=backend, overrelaxation=overrelaxation, **kw)
            return _errors_from_potentials(ta, tb, r.f, r.g, eps), int(out[1]['otd_iters'])
        return run, warm, evaluate

    def run():
        return sinkhorn(a, b, eps, backend=backend, overrelaxation=overrelaxation, **kw)

    def warm():
        sinkhorn(a[:, :256], b[:, :256], eps, num_iters=2, backend=backend)

    def evaluate(r):
        return _errors_from_potentials(a, b, r.f, r.g, eps), r.iters
    return run, warm, evaluate


def _run_public_vdot(spec, a, b, eps):
    """Public VDOT pattern (paper Algorithm 2 + autograd): per frame, materialised cost,
    log K = −C/ε, 60 unrolled log-domain iterations, T = exp(f + log K + g), loss Σ<T, C>,
    gradient w.r.t. the fake tokens by backprop through all iterations."""
    import torch

    from vdot_ext.losses.otd_loss import frames_to_tokens
    frames = spec['public_frames']
    ta_all = frames_to_tokens(a, 2)[:frames]
    tb_all = frames_to_tokens(b, 2)[:frames]
    iters = spec['iters']

    def one(ta, tb, n_iter):
        ta = ta.clone().requires_grad_(True)
        plans, total = [], 0.0
        for fr in range(ta.shape[0]):
            x, y = ta[fr], tb[fr]
            I, J = x.shape[0], y.shape[0]
            cost = 0.5 * torch.cdist(x, y).square()
            log_k = -cost / eps
            log_u = torch.full((I,), -math.log(I))
            log_v = torch.full((J,), -math.log(J))
            f = torch.zeros(I)
            g = torch.zeros(J)
            for _ in range(n_iter):
                f = log_u - torch.logsumexp(log_k + g[None, :], dim=1)
                g = log_v - torch.logsumexp(log_k + f[:, None], dim=0)
            plan = torch.exp(f[:, None] + log_k + g[None, :])
            total = total + (plan * cost).sum()
            plans.append(plan.detach())
        total.backward()
        return ta.grad, plans

    def run():
        return one(ta_all, tb_all, iters)

    def warm():
        one(ta_all[:1, :64], tb_all[:1, :64], 2)

    def evaluate(out):
        return _errors_from_plans(out[1]), iters
    return run, warm, evaluate


def _run_pot(spec, a, b, eps):
    import ot
    import torch
    n = a.shape[1]
    u = torch.full((n,), 1.0 / n)

    def solve(x, y, iters):
        cost = 0.5 * torch.cdist(x[0], y[0]).square()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return ot.sinkhorn(u[:x.shape[1]] * (n / x.shape[1]), u[:y.shape[1]] * (n / y.shape[1]), cost, eps,
                               method='sinkhorn_log', numItermax=iters, stopThr=0.0)

    def run():
        return solve(a, b, spec['iters'])

    def warm():
        solve(a[:, :256], b[:, :256], 2)

    def evaluate(plan):
        return _errors_from_plans([plan]), spec['iters']
    return run, warm, evaluate


def _run_ott(spec, a, b, eps, online):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn
    x, y = jnp.asarray(a[0].numpy()), jnp.asarray(b[0].numpy())
    iters = spec['iters']
    inner = 10 if iters % 10 == 0 else 1

    def solve(x, y):
        # ott's SqEuclidean is ‖x − y‖² = 2C: ε' = 2ε gives the same plan, potentials 2f, 2g
        geom = pointcloud.PointCloud(x, y, cost_fn=costs.SqEuclidean(), epsilon=2 * eps,
                                     batch_size=1024 if online else None)
        solver = ott_sinkhorn.Sinkhorn(max_iterations=iters, min_iterations=iters, inner_iterations=inner,
                                       threshold=0.0)
        out = solver(linear_problem.LinearProblem(geom))
        return out.f, out.g

    compiled = {}

    def warm():
        compiled['fn'] = jax.jit(solve).lower(x, y).compile()

    def run():
        f, g = compiled['fn'](x, y)
        return jax.block_until_ready(f), jax.block_until_ready(g)

    def evaluate(out):
        f = torch.from_numpy(np.asarray(out[0]).copy())[None] / 2
        g = torch.from_numpy(np.asarray(out[1]).copy())[None] / 2
        return _errors_from_potentials(a, b, f, g, eps, absorbed=True), iters
    return run, warm, evaluate


def _run_geomloss(spec, a, b, eps):
    import torch
    from geomloss._legacy.sinkhorn_divergence import log_weights, sinkhorn_loop
    from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

    def solve(x, y, iters):
        # geomloss's own tensorized solver loop, with a constant ε list (no ε-scaling) to run
        # exactly `iters` iterations at the target ε; its cost for p = 2 is ½‖x − y‖²
        w = torch.full((1, x.shape[1]), 1.0 / x.shape[1])
        v = torch.full((1, y.shape[1]), 1.0 / y.shape[1])
        c_xy = cost_routines[2](x, y)
        c_yx = cost_routines[2](y, x)
        _, _, g_ab, f_ba = sinkhorn_loop(softmin_tensorized, log_weights(w), log_weights(v), None, None,
                                         c_xy, c_yx, [eps] * iters, None, debias=False)
        return f_ba, g_ab

    def run():
        return solve(a, b, spec['iters'])

    def warm():
        solve(a[:, :256], b[:, :256], 2)

    def evaluate(out):
        return _errors_from_potentials(a, b, out[0], out[1], eps), spec['iters']
    return run, warm, evaluate


def _worker(spec):
    import torch
    torch.set_num_threads(spec['threads'])
    a, b = _make_inputs(spec)
    if spec['suite'] == 'paper':
        eps = spec['eps']
    else:
        eps = spec['eps_rel'] * _mean_cost(a, b)
    m = spec['method']
    if m in OURS:
        backend, tol_mode, relax, scaling = OURS[m]
        run, warm, evaluate = _run_ours(spec, a, b, eps, backend, tol=spec['tol'] if tol_mode else None,
                                        overrelaxation=relax, eps_scaling=spec['eps_scaling'] if scaling else None)
    elif m == 'public_vdot':
        run, warm, evaluate = _run_public_vdot(spec, a, b, eps)
    elif m == 'pot_sinkhorn_log':
        run, warm, evaluate = _run_pot(spec, a, b, eps)
    elif m in ('ott_dense', 'ott_online'):
        run, warm, evaluate = _run_ott(spec, a, b, eps, online=(m == 'ott_online'))
    elif m == 'geomloss_tensorized':
        run, warm, evaluate = _run_geomloss(spec, a, b, eps)
    else:
        raise ValueError(f'unknown method {m!r}')
    warm()
    gc.collect()
    _reset_peak()
    base_kb = _status_kb('VmRSS')
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = _status_kb('VmHWM') - base_kb
    (row_err, col_err), iters = evaluate(out)
    return dict(wall_s=wall, cpu_s=cpu, peak_extra_mb=peak_kb / 1024.0, row_err=row_err, col_err=col_err, iters=iters,
                eps=eps)


# ----------------------------------------------------------------------------- driver
def _skip_reason(spec):
    m = spec['method']
    mods = {'pot_sinkhorn_log': 'ot', 'ott_dense': 'ott', 'ott_online': 'ott', 'geomloss_tensorized': 'geomloss'}
    if m in mods:
        import importlib.util
        if importlib.util.find_spec(mods[m]) is None:
            return f'optional dependency `{mods[m]}` not installed (pip install pot geomloss ' \
                   '"jax[cpu]==0.8.*" ott-jax==0.6.0)'
    if spec['suite'] == 'large' and m in ('pot_sinkhorn_log', 'ott_dense', 'geomloss_tensorized'):
        nbytes = spec['n'] * spec['n'] * 4
        copies = {'pot_sinkhorn_log': 4, 'ott_dense': 2, 'geomloss_tensorized': 4}[m]
        if nbytes * copies > DENSE_LIMIT_BYTES:
            return (f'dense I×J matrices (~{copies}×{nbytes / 2**30:.1f} GiB) exceed the memory budget '
                    f'({DENSE_LIMIT_BYTES / 2**30:.0f} GiB) of this shared 24 GB machine')
    return None


def _run_spec(spec, timeout):
    reason = _skip_reason(spec)
    if reason:
        return dict(spec, status='skipped', reason=reason)
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(spec, status='timeout', reason=f'over {timeout} s')
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return dict(spec, status='ok', **json.loads(line[7:]))
    err = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return dict(spec, status='failed', reason=err[:300])


def _machine_info():
    import torch
    cpu = 'unknown'
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(nproc=os.cpu_count(), cpu=cpu, torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), load=' '.join(f'{x:.1f}' for x in os.getloadavg()),
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))


def _fmt(x, spec='{:.3g}'):
    return '–' if x is None else spec.format(x)


def render(rows, command=None):
    """Markdown for the RESULTS.md section from result rows."""
    info = next((r['machine'] for r in rows if 'machine' in r), None)
    out = [SECTION, '']
    if info:
        loads = '; '.join(sorted({r['machine']['date'] + ': ' + r['machine']['load'] for r in rows if 'machine' in r}))
        out += [f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, "
                f"{info['threads']} torch threads, Python {info['python']}; {info['date']}. "
                f"Load averages (1/5/15 min) when each invocation started: "
                f"{loads}"
                ' (the benchmark itself keeps about 2 threads busy; a higher load means other jobs shared the '
                'machine): compare ratios within one table and CPU times rather than absolute wall times.', '']
    if command:
        out += ['Command(s):', '', '```', *command, '```', '']
    out += ['Peak extra memory: each method runs in its own subprocess; after imports, inputs and a warm-up '
            'the peak-RSS counter is reset (`/proc/self/clear_refs` = 5) and `VmHWM − VmRSS(before)` is '
            'reported. CPU time = process user+sys time of the run (all threads): less sensitive to other jobs '
            'than wall time on a loaded machine. Marginal errors: L1, max over problems, recomputed in float64 from '
            'each method\'s output (plan, or potentials streamed in blocks). JAX: compiled before timing.', '']
    paper_eps = sorted({r['eps'] for r in rows if r.get('suite') == 'paper' and 'eps' in r})
    for suite, title in (('paper', 'Paper setting: 21 frames × 1560 tokens × 16 ch, ε = '
                          f"{', '.join(f'{e:g}' for e in paper_eps) or '?'} (cost ½‖a − b‖²), whole OTD gradient"),
                         ('large', 'Large clouds: I = J, D = 64, 30 iterations, solve only')):
        order = PAPER_METHODS if suite == 'paper' else LARGE_METHODS
        sub = sorted((r for r in rows if r.get('suite') == suite),
                     key=lambda r: (r.get('n') or 0, -(r.get('eps_rel') or 0), order.index(r['method'])))
        if not sub:
            continue
        out += [f'### {title}', '',
                '| problem | method | iters | wall time (s) | CPU time (s) | peak extra mem (MB) | row err | col err '
                '| note |',
                '|---|---|---|---|---|---|---|---|---|']
        for r in sub:
            prob = (f"{r['frames']}×{r['h'] * r['w']}×16, ε={r['eps']:g}" if suite == 'paper'
                    else f"I=J={r['n']}, ε={r['eps_rel']:g}×mean")
            note = r.get('note', '')
            if r['status'] != 'ok':
                out.append(f"| {prob} | {METHOD_LABEL[r['method']]} | – | – | – | – | – | – | "
                           f"{r['status']}: {r.get('reason', '')} |")
                continue
            out.append(f"| {prob} | {METHOD_LABEL[r['method']]} | {r['iters']} | {_fmt(r['wall_s'], '{:.2f}')} | "
                       f"{_fmt(r.get('cpu_s'), '{:.2f}')} | {_fmt(r['peak_extra_mb'], '{:.0f}')} | "
                       f"{_fmt(r['row_err'], '{:.1e}')} | "
                       f"{_fmt(r['col_err'], '{:.1e}')} | {note} |")
        out.append('')
        # ratios measured in the same run
        ratio_lines = []
        groups = {}
        for r in sub:
            if r['status'] == 'ok':
                key = (r.get('n'), r.get('eps_rel'))
                groups.setdefault(key, {})[r['method']] = r
        for key, g in groups.items():
            ours = g.get(BASELINE)
            if not ours:
                continue
            for other in ('public_vdot', 'pot_sinkhorn_log', 'ott_dense', 'ott_online', 'geomloss_tensorized',
                          'ours_sdpa', 'ours_blocked'):
                if other in g:
                    label = (f'I=J={key[0]}, ε={key[1]:g}×mean: ' if suite == 'large' else '')
                    ratio_lines.append(f"- {label}{METHOD_LABEL[other]} / {METHOD_LABEL[BASELINE]}: wall time "
                                       f"{g[other]['wall_s'] / ours['wall_s']:.1f}×, CPU time "
                                       f"{g[other]['cpu_s'] / max(ours['cpu_s'], 1e-9):.1f}×, peak memory "
                                       f"{g[other]['peak_extra_mb'] / max(ours['peak_extra_mb'], 1e-3):.0f}×")
        if ratio_lines:
            out += ['Ratios (same run):', ''] + ratio_lines + ['']
    return '\n'.join(out) + '\n'


def write_results(path, section_md):
    """Replace (or add) the Sinkhorn section of RESULTS.md, keeping other sections."""
    text = open(path).read() if os.path.exists(path) else '# Measured results\n\n'
    if not text.startswith('# Measured results'):
        text = '# Measured results\n\n' + text
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find('\n## ', start + len(SECTION))
        text = text[:start] + section_md + (text[nxt + 1:] if nxt >= 0 else '')
    else:
        text = text.rstrip('\n') + '\n\n' + section_md
    with open(path, 'w') as fh:
        fh.write(text)


# ----------------------------------------------------------------------------- in-process suites
def _convergence_cases(frames, seed):
    """name → (fake tokens, real tokens) [frames, 1560, 16]."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    n, d = 1560, 16

    def clusters(sep, w):
        x = torch.randn(frames, n, d, generator=gen)
        k = int(round(n * w))
        x[:, :k, 0] += sep / 2
        x[:, k:, 0] -= sep / 2
        return x

    spec = dict(suite='paper', seed=seed, frames=frames, h=30, w=52)
    fake_lat, real_lat = _make_inputs(spec)          # the paper suite's correlated predictions
    from vdot_ext.losses.otd_loss import frames_to_tokens
    fake_tok, real_tok = frames_to_tokens(fake_lat, 2), frames_to_tokens(real_lat, 2)
    near = fake_tok + 0.1 * torch.randn(fake_tok.shape, generator=gen)
    return {
        'two clusters, separation 8, mass 50/50 → 80/20': (clusters(8, 0.5), clusters(8, 0.8)),
        'two clusters, separation 12, mass 50/50 → 80/20': (clusters(12, 0.5), clusters(12, 0.8)),
        'latent-like: real = 0.7·shuffled fake + 0.7·noise': (fake_tok, real_tok),
        'latent-like: real = fake + 0.1·noise (late training)': (fake_tok, near),
    }


def convergence_suite(args):
    """Markdown: fixed iterations vs tolerance mode at ε = --paper-eps (docs/DESIGN.md §9)."""
    import torch

    from vdot_ext.ot import sinkhorn
    torch.set_num_threads(args.threads)
    eps = args.paper_eps
    variants = [('fixed 60 (paper)', dict(num_iters=60)), ('fixed 200', dict(num_iters=200)),
                ('tol 1e-2', dict(tol=1e-2, max_iters=20000)), ('tol 1e-3', dict(tol=1e-3, max_iters=20000))]
    lines = [f'Fixed iterations vs tolerance mode, ε = {eps:g} (cost ½‖a − b‖²), {args.conv_frames} frame(s) × '
             f'1560 tokens × 16 ch, float32, backend auto, {args.threads} threads. Step error: max over frames of '
             '‖ĝ − ĝ*‖ with ĝ = g/‖g‖ per frame (the l2_frame step OTDLoss applies) and ĝ* from a tol 1e-4 solve.',
             '', '| case | method | iters | wall (s) | true col err (max) | step error |', '|---|---|---|---|---|---|']

    def unit(g):
        return g.double() / g.double().flatten(1).norm(dim=1)[:, None, None]

    for name, (a, b) in _convergence_cases(args.conv_frames, args.seed).items():
        if args.conv_cases and not any(c in name for c in args.conv_cases):
            continue
        t0 = time.perf_counter()
        ref = sinkhorn(a, b, eps, tol=1e-4, max_iters=20000, return_gradient=True)
        lines.append(f'| {name} | reference (tol 1e-4) | {ref.iters} | {time.perf_counter() - t0:.2f} | '
                     f'{float(ref.col_err.max()):.1e} | – |')
        for label, kw in variants:
            t0 = time.perf_counter()
            r = sinkhorn(a, b, eps, return_gradient=True, **kw)
            wall = time.perf_counter() - t0
            err = float((unit(r.gradient) - unit(ref.gradient)).flatten(1).norm(dim=1).max())
            note = '' if r.converged is not False else ' (cap)'
            lines.append(f'| {name} | {label} | {r.iters}{note} | {wall:.2f} | {float(r.col_err.max()):.1e} | '
                         f'{err:.1e} |')
            print(lines[-1], flush=True)
    return '\n'.join(lines) + '\n'


def periter_suite(args):
    """Markdown: tolerance-mode ms per iteration vs the iteration count (an unconverging tiny problem)."""
    import torch

    from vdot_ext.ot import sinkhorn
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    a = torch.randn(1, 64, 4, generator=gen) * 0.3
    a[:, :32, 0] += 3
    b = torch.randn(1, 64, 4, generator=gen) * 0.3
    b[:, :12, 0] += 3                                  # unbalanced clusters at ε = 5e-4: thousands of iterations
    lines = ['| max_iters | iterations run | ms / iteration |', '|---|---|---|']
    for n in args.periter_iters:
        t0 = time.perf_counter()
        r = sinkhorn(a, b, 5e-4, tol=1e-5, max_iters=n, backend='fused_cpu')
        lines.append(f'| {n} | {r.iters} | {1e3 * (time.perf_counter() - t0) / max(r.iters, 1):.3f} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--suite', choices=['paper', 'large', 'all', 'convergence', 'periter'], default='all')
    p.add_argument('--methods', nargs='*', default=None, help='subset of methods (default: all of the suite)')
    p.add_argument('--sizes', nargs='*', type=int, default=[4096, 16384, 32760])
    p.add_argument('--eps-rel', nargs='*', type=float, default=[0.05, 0.005])
    p.add_argument('--large-iters', type=int, default=30)
    p.add_argument('--frames', type=int, default=21)
    p.add_argument('--public-frames', type=int, default=2,
                   help='frames the public-VDOT pattern runs on (extrapolated to --frames)')
    p.add_argument('--paper-eps', type=float, default=0.05,
                   help='ε of the paper and convergence suites, cost ½‖a − b‖² (0.05 = public code 0.1 on ‖a − b‖²)')
    p.add_argument('--conv-frames', type=int, default=1, help='frames (problems) per convergence case')
    p.add_argument('--conv-cases', nargs='*', default=None, help='subset of convergence cases (substring match)')
    p.add_argument('--periter-iters', nargs='*', type=int, default=[1000, 8000])
    p.add_argument('--paper-iters', type=int, default=60)
    p.add_argument('--tol', type=float, default=1e-3)
    p.add_argument('--eps-scaling', type=float, default=0.5, help='ε-annealing factor of ours_fused_tol_scaling')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--timeout', type=int, default=1800, help='seconds per method')
    p.add_argument('--jsonl', default=None, help='append result rows to this file')
    p.add_argument('--render', default=None, help='render a jsonl file (no runs)')
    p.add_argument('--results', default=None, help='write/replace the Sinkhorn section of this RESULTS.md')
    p.add_argument('--command-note', nargs='*', default=None, help='command lines to record in RESULTS.md')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print('RESULT ' + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return

    if args.suite == 'convergence':
        print(convergence_suite(args))
        return
    if args.suite == 'periter':
        print(periter_suite(args))
        return

    if args.render:
        with open(args.render) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        md = render(rows, args.command_note)
        print(md)
        if args.results:
            write_results(args.results, md)
        return

    machine = _machine_info()
    specs = []
    base = dict(threads=args.threads, seed=args.seed)
    if args.suite in ('paper', 'all'):
        for m in args.methods or PAPER_METHODS:
            if m not in PAPER_METHODS:
                continue
            specs.append(dict(base, suite='paper', method=m, frames=args.frames, h=30, w=52, eps=args.paper_eps,
                              iters=args.paper_iters, tol=args.tol, public_frames=args.public_frames,
                              eps_scaling=args.eps_scaling))
    if args.suite in ('large', 'all'):
        for n in args.sizes:
            for er in args.eps_rel:
                for m in args.methods or LARGE_METHODS:
                    if m not in LARGE_METHODS:
                        continue
                    specs.append(dict(base, suite='large', method=m, n=n, d=64, eps_rel=er, iters=args.large_iters))
    rows = []
    for spec in specs:
        t0 = time.time()
        row = _run_spec(spec, args.timeout)
        row['machine'] = machine
        if row['method'] == 'public_vdot' and row['status'] == 'ok':
            k = row['frames'] / row['public_frames']
            row['note'] = (f"measured on {row['public_frames']} frames: {row['wall_s']:.2f} s, "
                           f"{row['peak_extra_mb']:.0f} MB; extrapolated ×{k:g}")
            row['wall_s'] *= k
            row['cpu_s'] *= k
            row['peak_extra_mb'] *= k
        if row['method'] in OURS and OURS[row['method']][1] and row['status'] == 'ok':
            row['note'] = f"stop at col err ≤ {row['tol']:g}"
            if OURS[row['method']][3]:
                row['note'] += (f"; ε-scaling q = {row['eps_scaling']:g} from ε_0 = largest centred cost "
                                '(annealing iterations counted)')
        rows.append(row)
        print(f"[{time.time() - t0:6.1f}s] {json.dumps({k: v for k, v in row.items() if k != 'machine'})}",
              flush=True)
        if args.jsonl:
            with open(args.jsonl, 'a') as fh:
                fh.write(json.dumps(row) + '\n')
    command = ' '.join(['python', 'benchmarks/bench_sinkhorn.py'] + (argv or sys.argv[1:]))
    md = render(rows, args.command_note or [command])
    print(md)
    if args.results:
        write_results(args.results, md)


if __name__ == '__main__':
    main()
