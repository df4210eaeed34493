"""The fused CPU Sinkhorn kernel (vdot_ext/ot/csrc/sinkhorn_cpu.c): one kernel call per (f, g)
iteration. Checked against float64 dense maths (kernel outputs), the dense float64 reference solver
(plans, potentials, gradients), the per-half-step sdpa path, extreme inputs, the exact log-domain
rescue of underflowing columns, thread counts, and its build / opt-out errors."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vdot_ext.ot import sinkhorn, sinkhorn_reference
from vdot_ext.ot.cpu_kernel import FusedCPUIteration, load_kernel
from vdot_ext.ot.streaming import resolve_backend

REPO = Path(__file__).resolve().parents[1]


def _clouds(P, I, J, D, seed, scale_b=0.8, shift_b=0.3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(P, I, D, generator=gen, dtype=torch.float64)
    b = torch.randn(P, J, D, generator=gen, dtype=torch.float64) * scale_b + shift_b
    return a, b


def _mean_cost(a, b):
    return float(0.5 * torch.cdist(a.double(), b.double()).square().mean())


def _rel(x, y):
    return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- one kernel call vs float64 maths
@pytest.mark.parametrize('shape', [(1, 1, 1, 1), (2, 13, 7, 3), (3, 50, 37, 16), (1, 97, 130, 64)])
def test_one_iteration_matches_float64_maths(shape):
    """L_i = LSE_j S_ij and M_j = Σ_i exp(S_ij + c_i), c_i = log u_i + (1 − ω) q_i − ω L_i;
    sizes that are not multiples of the kernel's row / column tiles, with ω = 1 and ω ≠ 1."""
    load_kernel()
    P, I, J, D = shape
    a, b = _clouds(P, I, J, D, seed=sum(shape))
    gen = torch.Generator().manual_seed(1)
    eps = 0.3 * max(_mean_cost(a, b), 1e-3)
    h = torch.randn(P, J, generator=gen, dtype=torch.float64) - math.log(J)
    log_u = torch.log_softmax(torch.randn(P, I, generator=gen, dtype=torch.float64), dim=1)
    q = torch.randn(P, I, generator=gen, dtype=torch.float64) - math.log(J)
    omega = torch.linspace(1.0, 1.8, P, dtype=torch.float64)
    kernel = FusedCPUIteration(a.float(), b.float(), log_u.float())
    S = a @ b.transpose(1, 2) / eps + h[:, None, :]
    L = torch.logsumexp(S, dim=2)
    for q_arg, om in ((None, torch.ones(P, dtype=torch.float64)), (q, omega)):
        lse, mass = kernel(h.float(), eps, None if q_arg is None else q_arg.float(), None if q_arg is None else om)
        assert lse.shape == (P, I) and mass.shape == (P, J) and mass.dtype == torch.float64
        torch.testing.assert_close(lse.double(), L, rtol=0, atol=2e-5 * float(L.abs().max().clamp_min(1)))
        c = log_u + (1 - om[:, None]) * (q if q_arg is not None else 0) - om[:, None] * L
        M = torch.exp(S + c[:, :, None]).sum(dim=1)
        assert _rel(mass, M) < 2e-5


def test_thread_count_does_not_change_the_result():
    a, b = _clouds(3, 301, 257, 16, seed=3)
    eps = 0.05 * _mean_cost(a, b)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sinkhorn(a.float(), b.float(), eps, num_iters=20, return_gradient=True, backend='fused_cpu')
        torch.set_num_threads(2)
        two = sinkhorn(a.float(), b.float(), eps, num_iters=20, return_gradient=True, backend='fused_cpu')
    finally:
        torch.set_num_threads(old)
    assert _rel(one.f, two.f) < 1e-6 and _rel(one.g, two.g) < 1e-6
    assert _rel(one.gradient, two.gradient) < 1e-5


# ---------------------------------------------------------------- whole solver vs references
@pytest.mark.parametrize('shape', [(1, 30, 20, 3), (3, 17, 40, 16), (2, 64, 48, 64)])
def test_fixed_iterations_match_dense_float64_reference(shape):
    P, I, J, D = shape
    a, b = _clouds(P, I, J, D, seed=sum(shape))
    eps = 0.02 * _mean_cost(a, b)
    ours = sinkhorn(a.float(), b.float(), eps, num_iters=10, return_gradient=True, return_plan=True,
                    backend='fused_cpu')
    ref = sinkhorn_reference(a.float().double(), b.float().double(), eps, num_iters=10, center=True)
    assert ours.backend == 'fused_cpu' and ours.iters == 10 and ours.exact_g_steps == 0
    assert _rel(ours.plan, ref.plan) < 5e-4
    assert _rel(ours.gradient, ref.gradient) < 5e-4
    torch.testing.assert_close(ours.f.double(), ref.f, rtol=0, atol=1e-4 * float(ref.f.abs().max()))
    torch.testing.assert_close(ours.g.double(), ref.g, rtol=0, atol=1e-4 * float(ref.g.abs().max()))
    torch.testing.assert_close(ours.col_err.double(), ref.col_err, rtol=2e-2, atol=1e-6)
    assert float(ours.row_err.max()) < 1e-5          # rows exact after the last f half-step
    assert float(ours.col_err.min()) > 1e-4          # unconverged: the comparison is not trivial


def test_same_iterates_as_sdpa_path():
    a, b = _clouds(4, 300, 257, 16, seed=20)
    eps = 0.02 * _mean_cost(a, b)
    r1 = sinkhorn(a.float(), b.float(), eps, num_iters=30, return_gradient=True, backend='fused_cpu')
    r2 = sinkhorn(a.float(), b.float(), eps, num_iters=30, return_gradient=True, backend='sdpa')
    assert _rel(r1.f, r2.f) < 1e-5 and _rel(r1.g, r2.g) < 1e-5
    assert _rel(r1.gradient, r2.gradient) < 1e-4
    torch.testing.assert_close(r1.col_err, r2.col_err, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize('overrelaxation', ['auto', None, 1.5])
def test_tolerance_mode_and_overrelaxation_converge_to_reference(overrelaxation):
    a, b = _clouds(3, 150, 130, 16, seed=17)
    eps = 0.05 * _mean_cost(a, b)
    kw = dict(tol=1e-4, max_iters=3000) if overrelaxation != 1.5 else dict(num_iters=400)
    ours = sinkhorn(a.float(), b.float(), eps, return_plan=True, return_gradient=True,
                    overrelaxation=overrelaxation, backend='fused_cpu', **kw)
    ref = sinkhorn_reference(a.float().double(), b.float().double(), eps, tol=1e-10)
    if overrelaxation != 1.5:
        assert ours.converged
    assert float(ours.col_err.max()) <= 1e-4 and float(ours.row_err.max()) < 1e-5
    assert _rel(ours.plan, ref.plan) < 2e-3
    assert _rel(ours.gradient, ref.gradient) < 2e-3


def test_given_marginals():
    a, b = _clouds(2, 25, 31, 5, seed=12)
    gen = torch.Generator().manual_seed(13)
    wa = torch.rand(2, 25, generator=gen, dtype=torch.float64) + 0.1
    wb = torch.rand(31, generator=gen, dtype=torch.float64) + 0.1
    eps = 0.1 * _mean_cost(a, b)
    ours = sinkhorn(a.float(), b.float(), eps, tol=1e-5, a_weights=wa, b_weights=wb, return_plan=True,
                    return_gradient=True, backend='fused_cpu')
    ref = sinkhorn_reference(a.float().double(), b.float().double(), eps, tol=1e-12, a_weights=wa, b_weights=wb)
    assert _rel(ours.plan, ref.plan) < 1e-3 and _rel(ours.gradient, ref.gradient) < 1e-3


# ---------------------------------------------------------------- extreme inputs
def _assert_finite(res):
    for t in (res.f, res.g, res.row_err, res.col_err, res.gradient):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_epsilon_is_finite_and_correct(dtype):
    a, b = _clouds(2, 60, 50, 16, seed=14)
    a, b = a.to(dtype), b.to(dtype)
    eps = 1e-3 * _mean_cost(a, b)
    res = sinkhorn(a, b, eps, num_iters=30, return_gradient=True, backend='fused_cpu')
    _assert_finite(res)
    ref = sinkhorn_reference(a.double(), b.double(), eps, num_iters=30, center=True)
    assert _rel(res.gradient, ref.gradient) < 5e-2


def test_underflowing_columns_are_redone_in_the_log_domain():
    """An outlier target point far from every source: at the first g half-step its column mass is
    ~exp(−10^4), far below float range. The kernel hands that step to the exact log-domain pass
    (``exact_g_steps``), and the result equals the per-half-step solver's."""
    a, b = _clouds(2, 80, 60, 8, seed=30)
    b[:, 0] += 40.0
    eps = 2e-3 * _mean_cost(a, b)
    fused = sinkhorn(a.float(), b.float(), eps, num_iters=25, return_gradient=True, backend='fused_cpu')
    plain = sinkhorn(a.float(), b.float(), eps, num_iters=25, return_gradient=True, backend='sdpa')
    _assert_finite(fused)
    assert fused.exact_g_steps >= 1
    assert fused.exact_g_steps < 25                  # only while masses underflow, not every step
    assert _rel(fused.g, plain.g) < 1e-4 and _rel(fused.f, plain.f) < 1e-4
    assert _rel(fused.gradient, plain.gradient) < 1e-3


def test_duplicated_points():
    a, _ = _clouds(1, 10, 1, 8, seed=15)
    a = a.repeat(1, 4, 1)
    b = torch.cat([a[:, :20], a[:, :20]], dim=1)
    eps = 1e-3 * _mean_cost(a, b)
    res = sinkhorn(a.float(), b.float(), eps, num_iters=50, return_gradient=True, return_plan=True,
                   backend='fused_cpu')
    _assert_finite(res)
    ref = sinkhorn_reference(a, b, eps, num_iters=50, center=True)
    torch.testing.assert_close(res.plan.double(), ref.plan, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_far_apart_clouds(dtype):
    a, b = _clouds(2, 40, 30, 16, seed=21)
    a_lp, b_lp = (a * 30 + 1e4).to(dtype), (b * 30 - 3e3).to(dtype)
    eps = 1e-3 * _mean_cost(a_lp, b_lp)
    res = sinkhorn(a_lp, b_lp, eps, num_iters=30, return_gradient=True, backend='fused_cpu')
    _assert_finite(res)
    ref = sinkhorn_reference(a_lp.double(), b_lp.double(), eps, num_iters=30, center=True)
    assert _rel(res.gradient, ref.gradient) < 1e-3


# ---------------------------------------------------------------- dispatch, build and opt-out
def test_auto_picks_the_fused_kernel_for_float32_cpu():
    assert resolve_backend('auto', torch.device('cpu'), torch.float32) == 'fused_cpu'
    assert resolve_backend('auto', torch.device('cpu'), torch.float64) == 'sdpa'
    with pytest.raises(ValueError, match='float32 CPU'):
        resolve_backend('fused_cpu', torch.device('cpu'), torch.float64)
    with pytest.raises(ValueError, match='float32 CPU'):
        sinkhorn(torch.zeros(1, 3, 2, dtype=torch.float64), torch.ones(1, 3, 2, dtype=torch.float64), 1.0,
                 backend='fused_cpu')
    res = sinkhorn(torch.randn(1, 9, 4), torch.randn(1, 7, 4), 1.0, num_iters=3)
    assert res.backend == 'fused_cpu'


def _python(script, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env=full_env, cwd=str(REPO))


def test_opt_out_falls_back_with_a_warning_and_explicit_request_fails():
    out = _python("""
        import warnings, torch
        from vdot_ext.ot import sinkhorn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            r = sinkhorn(torch.randn(1, 9, 4), torch.randn(1, 7, 4), 1.0, num_iters=3)
        print(r.backend, '|', caught[0].message)
        try:
            sinkhorn(torch.randn(1, 9, 4), torch.randn(1, 7, 4), 1.0, backend='fused_cpu')
        except ValueError as exc:
            print('ERR', exc)
    """, VDOT_EXT_SINKHORN_KERNEL='0')
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith('sdpa |') and 'VDOT_EXT_SINKHORN_KERNEL=0' in first
    assert second.startswith('ERR') and 'unavailable' in second


def test_compiler_failure_is_reported_and_the_cache_is_reused(tmp_path):
    broken = _python("""
        from vdot_ext.ot.cpu_kernel import kernel_error
        print(kernel_error())
    """, CC='false', VDOT_EXT_KERNEL_CACHE=str(tmp_path / 'broken'))
    assert broken.returncode == 0, broken.stderr
    assert 'compiling' in broken.stdout and 'sinkhorn_cpu.c' in broken.stdout
    assert not list((tmp_path / 'broken').glob('*.so'))           # no half-written library left

    script = """
        from vdot_ext.ot.cpu_kernel import load_kernel
        print(load_kernel()._name)
    """
    first = _python(script, VDOT_EXT_KERNEL_CACHE=str(tmp_path / 'ok'))
    assert first.returncode == 0, first.stderr
    built = Path(first.stdout.strip())
    assert built.parent == tmp_path / 'ok' and built.exists()
    stamp = built.stat().st_mtime_ns
    second = _python(script, VDOT_EXT_KERNEL_CACHE=str(tmp_path / 'ok'))
    assert Path(second.stdout.strip()) == built and built.stat().st_mtime_ns == stamp
