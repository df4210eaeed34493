"""Sinkhorn numerics at large input magnitudes (float32 cannot resolve the scores), true marginal errors, the
precision flag and warnings, W_ε / <T, C>, and the argument errors for empty or non-finite inputs."""
import warnings

import pytest
import torch

from vdot_ext.ot import PRECISION_LIMIT, marginal_errors, sinkhorn, sinkhorn_reference
from vdot_ext.utils import NonFiniteError

P, I, J, D = 2, 64, 64, 16
EPS = 0.1           # the setting: ε = 0.1 at input magnitudes 1e3–1e6


def _clouds(scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(P, I, D, generator=gen, dtype=torch.float64)
    b = torch.randn(P, J, D, generator=gen, dtype=torch.float64) * 0.7 + 0.4
    return (a * scale).float(), (b * scale).float()


def _rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def _solve(a, b, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        res = sinkhorn(a, b, EPS, return_gradient=True, return_plan=True, **kw)
    return res, [str(w.message) for w in caught]


# ---------------------------------------------------------------- large magnitudes vs the float64 reference
@pytest.mark.parametrize('backend', ['auto', 'fused_cpu', 'sdpa', 'blocked'])
@pytest.mark.parametrize('scale,grad_tol,err_tol', [(1e3, 1e-6, 1e-6), (1e4, 1e-5, 1e-5), (1e6, 2e-2, 1e-2)])
def test_large_magnitudes_match_float64_reference(scale, grad_tol, err_tol, backend):
    """Before: the float32 gradient was 12–29 % off here and the logged column error read 0 (true: 0.50).

    The float32 Gram product alone is off by |Δ(a·b)|/ε ≈ 17 at scale 1e3; the solver detects this (κ·u₃₂ ≫
    PRECISION_LIMIT) and solves in float64. At 1e6 even float64 is at its limit: accurate to ~1 %, flagged.
    """
    a, b = _clouds(scale)
    ref = sinkhorn_reference(a.double(), b.double(), EPS, num_iters=60, center=True)
    res, msgs = _solve(a, b, num_iters=60, backend=backend)
    assert res.promoted and res.compute_dtype == torch.float64
    assert res.backend in ('sdpa', 'blocked')                  # the float64 path ran, and says so
    assert any('solving in float64' in m for m in msgs)
    assert _rel(res.gradient, ref.gradient) < grad_tol
    # the reported errors are the true ones of the returned plan (the reference's, and the plan's own)
    torch.testing.assert_close(res.col_err.double(), ref.col_err, rtol=0, atol=err_tol)
    row, col = marginal_errors(res.plan)
    torch.testing.assert_close(res.col_err.double(), col, rtol=0, atol=err_tol)
    assert float(res.col_err.min()) > 0.3                     # far from converged: must not read 0
    assert float(row.max()) < err_tol and float(res.row_err.max()) < err_tol
    assert res.precision_ok == (scale < 1e6) and res.precision_bound > 0


@pytest.mark.parametrize('backend', ['fused_cpu', 'sdpa'])
def test_forced_float32_in_that_regime_warns_flags_and_never_reads_zero(backend):
    a, b = _clouds(1e4)
    res, msgs = _solve(a, b, num_iters=60, precision='float32', backend=backend)
    assert res.compute_dtype == torch.float32 and not res.promoted and res.backend == backend
    assert not res.precision_ok and res.precision_bound > PRECISION_LIMIT
    assert any('float32 cannot resolve' in m for m in msgs)
    # nothing is accurate here (flagged), but the column error comes from a log-sum-exp over the plan's
    # columns, not from two rounded potentials: it does not read 0 (true ≈ 0.35–0.5; before: exactly 0)
    assert float(res.col_err.min()) > 0.01


def test_beyond_float64_warns_and_flags():
    a, b = _clouds(1e7)
    res, msgs = _solve(a, b, num_iters=5)
    assert res.promoted and not res.precision_ok
    assert any('float64 cannot resolve' in m for m in msgs)


def test_normal_scale_stays_float32_without_warning():
    a, b = _clouds(1.0)
    res, msgs = _solve(a, b, num_iters=10, backend='fused_cpu')
    assert res.compute_dtype == torch.float32 and not res.promoted and res.precision_ok
    assert res.backend == 'fused_cpu' and not msgs
    assert res.precision_bound < 1e-3


def test_tolerance_mode_at_large_magnitude_does_not_stop_on_a_stale_error():
    """Before: at 1e4 the float32 error read 0 at once, so tolerance mode stopped after 0 iterations as
    'converged' with a plan whose column error is 0.5."""
    a, b = _clouds(1e4)
    res, _ = _solve(a, b, tol=1e-3, max_iters=30)
    row, col = marginal_errors(res.plan)
    assert not res.converged and res.iters == 30
    torch.testing.assert_close(res.col_err.double(), col, rtol=0, atol=1e-5)
    assert float(col.min()) > 0.1


# ---------------------------------------------------------------- W_ε and <T, C>
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_dual_value_and_transport_cost_equal_dense_formulas(dtype):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 30, 5, generator=gen, dtype=torch.float64) + 2.0
    b = torch.randn(2, 25, 5, generator=gen, dtype=torch.float64) * 0.6 - 1.0
    eps = 0.3
    res = sinkhorn(a.to(dtype), b.to(dtype), eps, tol=1e-10 if dtype == torch.float64 else 1e-5,
                   return_gradient=True)
    ref = sinkhorn_reference(a, b, eps, tol=1e-12)
    cost = 0.5 * (a[:, :, None] - b[:, None]).square().sum(-1)
    plan = ref.plan
    transport = (plan * cost).sum(dim=(1, 2))
    kl = (plan * (plan.log() + torch.log(torch.tensor(30.0 * 25.0, dtype=torch.float64)))).sum(dim=(1, 2))
    w_eps = transport + eps * kl                       # primal value <T, C> + ε KL(T | u⊗μ)
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.transport_cost, transport, **tol)
    torch.testing.assert_close(res.dual_value, w_eps, **tol)
    assert res.dual_value.dtype == torch.float64
    # fixed iterations without the gradient: the dual value is still there; <T, C> needs the extra pass
    quick = sinkhorn(a, b, eps, num_iters=3)
    assert quick.dual_value is not None and quick.transport_cost is None


# ---------------------------------------------------------------- argument errors
def test_empty_batch_and_empty_clouds_name_the_argument():
    a = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r'empty batch \(P = 0'):
        sinkhorn(a[:0], a[:0], 0.1)
    with pytest.raises(ValueError, match=r'^a is an empty cloud \(0 points\)'):
        sinkhorn(a[:, :0], a, 0.1)
    with pytest.raises(ValueError, match=r'^b is an empty cloud \(0 points\)'):
        sinkhorn(a, a[:, :0], 0.1, tol=1e-3)
    with pytest.raises(ValueError, match=r'no features \(D = 0\)'):
        sinkhorn(a[..., :0], a[..., :0], 0.1)


def test_non_finite_inputs_name_the_argument_and_problem():
    a, b = torch.randn(3, 5, 2), torch.randn(3, 4, 2)
    bad = b.clone()
    bad[1, 2, 0] = float('inf')
    with pytest.raises(NonFiniteError, match=r'b must be finite, got NaN/Inf in problem\(s\) \[1\]'):
        sinkhorn(a, bad, 0.1)
    with pytest.raises(ValueError, match=r'a must be finite'):          # NonFiniteError is a ValueError
        sinkhorn(a * float('nan'), b, 0.1)
    with pytest.raises(ValueError, match="precision must be"):
        sinkhorn(a, b, 0.1, precision='bf16')


def test_explicit_float64_with_a_float32_only_backend_is_refused():
    a, b = _clouds(1.0)
    with pytest.raises(ValueError, match="backend='fused_cpu' runs float32 CPU tensors"):
        sinkhorn(a, b, EPS, precision='float64', backend='fused_cpu')
    res = sinkhorn(a, b, EPS, num_iters=3, precision='float64', backend='sdpa')
    assert res.compute_dtype == torch.float64 and res.promoted and res.precision_ok
