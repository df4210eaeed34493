"""Optimal transport distillation (OTD) loss, VDOT paper §4.2 (eqs. 7–10).

Per latent frame, the fake-score and real-score x0 predictions are turned into token clouds
(k×k average pooling over space: 60×104 latents, k = 2 → 1560 tokens × 16 channels), one entropic
OT problem per frame and batch element, all solved in one batched log-domain Sinkhorn call
(:mod:`vdot_ext.ot`). The gradient is the envelope-theorem gradient, never backprop through
the iterations:

    g_i = ∂W_ε/∂a_i = Σ_j T*_ij (a_i − b_j) = a_i (T*1)_i − (T* b)_i        (VDOT eq. 8)

a = tokens of the fake-score x0 prediction, b = tokens of the real-score (teacher) x0 prediction.
g is mapped back to full resolution by the adjoint of the pooling, normalised, and applied to the
generator sample x in the DMD manner (docs/DESIGN.md §5, Eq. 15):

    L = loss_weight · 0.5 · Σ (x − sg(x − c·ĝ))²,   so ∂L/∂x = loss_weight · c · ĝ.

L is a surrogate whose value carries no information (constant under 'l2_frame'); the entropic OT cost W_ε, the
raw and applied gradient norms and the true marginal errors are in ``OTDLoss.last_stats``.

ε is in units of the cost ½‖a − b‖² (default 0.05 = the public code's 0.1 on ‖a − b‖²).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdot_ext.ot.sinkhorn import sinkhorn
from vdot_ext.ot.streaming import DEFAULT_BLOCK_ELEMS
from vdot_ext.registry import MODELS
from vdot_ext.utils import NonFiniteError

from .utils import surrogate_loss

__all__ = ['OTDLoss', 'frames_to_tokens', 'tokens_to_frames_adjoint']

_NORMALIZE = ('l2_frame', 'none', 'mean_abs')


def frames_to_tokens(x: Tensor, pool_kernel: int) -> Tensor:
    """[B, C, F, H, W] → [B·F, (H/k)·(W/k), C]: k×k average pooling per frame, positions as tokens.

    Problem p = b·F + f (batch-major), token n = row-major pooled position.
    """
    if x.dim() != 5:
        raise ValueError(f'OTDLoss expects latents [B, C, F, H, W], got shape {tuple(x.shape)}')
    B, C, Fr, H, W = x.shape
    k = pool_kernel
    if H % k or W % k:
        raise ValueError(f'OTDLoss: latent height {H} and width {W} must be divisible by pool_kernel={k} '
                         '(the pooling adjoint needs whole k×k windows)')
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    if k > 1:
        frames = F.avg_pool2d(frames, k)                      # mean over each k×k window
    return frames.flatten(2).transpose(1, 2)                  # [B·F, N, C]


def tokens_to_frames_adjoint(tokens: Tensor, shape, pool_kernel: int) -> Tensor:
    """Adjoint of :func:`frames_to_tokens`: [B·F, N, C] → [B, C, F, H, W].

    Average pooling y = (1/k²) Σ_window x has adjoint x_window = y / k² (each of the k² pixels of a
    window receives 1/k² of the token's value), so <pool(x), y> = <x, pool*(y)>.
    """
    B, C, Fr, H, W = shape
    k = pool_kernel
    g = tokens.transpose(1, 2).reshape(B * Fr, C, H // k, W // k)
    if k > 1:
        g = g.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) / (k * k)
    return g.reshape(B, Fr, C, H, W).permute(0, 2, 1, 3, 4)


_ROLES = {'x': 'generator sample', 'pred_fake_x0': 'fake-score x0 prediction',
          'pred_real_x0': 'real-score (teacher) x0 prediction'}


def _check_inputs(**inputs: Tensor) -> None:
    """Empty tensors are a ValueError, NaN/Inf a NonFiniteError; both name the argument(s) (docs/DESIGN.md §11)."""
    for name, t in inputs.items():
        if t.numel() == 0:
            raise ValueError(f'OTDLoss: {name} ({_ROLES[name]}) is empty: shape {tuple(t.shape)}; an empty batch '
                             'has no OT problem to solve')
    bad = {}
    for name, t in inputs.items():
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad[name] = (~finite).flatten(1).any(1).nonzero().flatten().tolist() if t.dim() > 1 else [0]
    if bad:
        what = '; '.join(f'{name} ({_ROLES[name]}) in batch element(s) {idx[:8]}{" ..." if len(idx) > 8 else ""}'
                         for name, idx in bad.items())
        exc = NonFiniteError(f'OTDLoss: NaN/Inf in {what}; the OT problem is undefined (the batch should be '
                             'skipped, docs/DESIGN.md §11)')
        exc.input_names = list(bad)                                       # for the training-step guard
        exc.batch_indices = sorted({i for idx in bad.values() for i in idx})
        raise exc


@MODELS.register_module()
class OTDLoss(nn.Module):
    """OTD loss on plain tensors (usable outside any trainer).

    Args:
        epsilon: entropic regularisation ε **in units of the cost ½‖a − b‖²** (docs/DESIGN.md §5, Eq. 12). Default
            0.05 = the public VDOT code's ε = 0.1, which it applies to ‖a − b‖² (``cdist²``): the same plan
            exp(−‖a − b‖²/0.1) = exp(−½‖a − b‖²/0.05). The paper gives no value.
        num_iters: fixed Sinkhorn iterations (paper and public code: 60); used only when ``tol`` is None.
        pool_kernel: k of the k×k spatial average pooling that makes tokens (paper: 2).
        normalize: 'l2_frame' (paper: g / ‖g‖₂ per batch element and frame), 'none', or
            'mean_abs' (g / mean|g| per batch element, the DMD-style normaliser; the OT gradient
            carries the 1/I of uniform marginals, so it is normalised by its own scale).
        grad_scale: c in L = 0.5 Σ (x − sg(x − c·g))² (public VDOT code: 0.1).
        tol: tolerance mode (default 1e-3): Sinkhorn runs until the column-marginal L1 error ≤ tol (≥ 1e-5 in
            float32) or ``max_iters``; None: ``num_iters`` fixed iterations, as the paper. Chosen by measurement
            at ε = 0.05 (docs/DESIGN.md §9; ``benchmarks/bench_sinkhorn.py --suite convergence``): 60 iterations
            leave the normalised step 12 % off on latent-like clouds and 71–96 % off on two separated clusters;
            tol 1e-3 keeps it within 0.4 % (202 and 758–1438 iterations; 0 when fake ≈ real).
        loss_weight: multiplies the loss.
        max_iters: iteration cap in tolerance mode.
        overrelaxation: Sinkhorn over-relaxation ('auto': adaptive in tolerance mode only).
        eps_scaling: tolerance mode only: ε-annealing factor in (0, 1) (see :func:`vdot_ext.ot.sinkhorn`);
            None (default) iterates at ε from the start.
        backend: 'auto' | 'fused_cpu' | 'sdpa' | 'blocked' | 'triton' (see :mod:`vdot_ext.ot.streaming`).
        block_elems: scores held at once by the blocked backend.
        norm_eps: floor of the normaliser (avoids 0/0 when fake == real).
        precision: Sinkhorn compute precision, 'auto' | 'float32' | 'float64' (see :func:`vdot_ext.ot.sinkhorn`):
            'auto' solves in float64 when float32 cannot resolve the costs (unit-variance 16-channel latents
            scaled by ≳ 9 at ε = 0.05).

    The returned value is a **surrogate**, not a loss curve: only its gradient, loss_weight·c·ĝ on x, means
    anything (its value is loss_weight·½·c²·‖ĝ‖², the constant loss_weight·½·c²·B·F under 'l2_frame'). Log
    ``last_stats`` instead.
    After each forward / ot_gradient, ``last_stats`` holds floats (mean over the B·F problems unless noted):

    - 'otd_w_eps': entropic OT cost W_ε between the fake and real token clouds, as the dual value
      <u, f> + <μ, g> (= min_T <T, C> + ε KL(T | u⊗μ) at convergence; token units, ½‖·‖² cost);
    - 'otd_transport_cost': the primal transport cost <T, C> of the returned plan;
    - 'otd_grad_norm': ‖g_OT‖₂ of the raw envelope gradient at full resolution, whole batch, before
      normalisation (what W_ε's gradient on x would be); 'otd_step_norm': ‖∂L/∂x‖₂ = loss_weight·c·‖ĝ‖₂, the
      step actually applied to x;
    - 'otd_row_err' / 'otd_col_err' (+ '_max': worst problem): true L1 marginal errors of the returned plan;
    - 'otd_iters': Sinkhorn iterations used; 'otd_converged' (tolerance mode): 1.0 if every problem reached tol;
    - 'otd_problems' (B·F); 'otd_exact_g_steps' (backend 'fused_cpu': g half-steps redone in the log domain);
    - 'otd_float64': 1.0 if the solve ran in float64 for float32 inputs (with precision='auto': because float32
      could not resolve it, a warning was issued); 'otd_precision_ok':
      0.0 if even the compute dtype could not (a warning was issued).

    Raises:
        vdot_ext.utils.NonFiniteError: NaN/Inf in x, pred_fake_x0 or pred_real_x0 (the message names which,
            and the batch elements; ``exc.input_names`` / ``exc.batch_indices``), before the solver runs.
        ValueError: empty or mismatched inputs.
    """

    def __init__(self, epsilon: float = 0.05, num_iters: int = 60, pool_kernel: int = 2,
                 normalize: str = 'l2_frame', grad_scale: float = 0.1, tol: Optional[float] = 1e-3,
                 loss_weight: float = 1.0, max_iters: int = 2000, overrelaxation='auto',
                 backend: str = 'auto', block_elems: int = DEFAULT_BLOCK_ELEMS, norm_eps: float = 1e-12,
                 eps_scaling: Optional[float] = None, precision: str = 'auto'):
        super().__init__()
        if not epsilon > 0:
            raise ValueError(f'OTDLoss: epsilon must be > 0, got {epsilon}')
        if int(pool_kernel) != pool_kernel or pool_kernel < 1:
            raise ValueError(f'OTDLoss: pool_kernel must be a positive integer, got {pool_kernel}')
        if normalize not in _NORMALIZE:
            raise ValueError(f'OTDLoss: normalize must be one of {_NORMALIZE}, got {normalize!r}')
        if num_iters < 0:
            raise ValueError(f'OTDLoss: num_iters must be >= 0, got {num_iters}')
        if eps_scaling is not None and tol is None:
            raise ValueError('OTDLoss: eps_scaling needs tolerance mode (set tol)')
        if precision not in ('auto', 'float32', 'float64'):
            raise ValueError(f"OTDLoss: precision must be 'auto', 'float32' or 'float64', got {precision!r}")
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.pool_kernel = int(pool_kernel)
        self.normalize = normalize
        self.grad_scale = float(grad_scale)
        self.tol = tol
        self.loss_weight = float(loss_weight)
        self.max_iters = int(max_iters)
        self.overrelaxation = overrelaxation
        self.eps_scaling = eps_scaling
        self.backend = backend
        self.block_elems = int(block_elems)
        self.norm_eps = float(norm_eps)
        self.precision = precision
        self.last_stats: Dict[str, float] = {}

    def extra_repr(self) -> str:
        return (f'epsilon={self.epsilon} (cost ½‖a−b‖²), num_iters={self.num_iters}, tol={self.tol}, '
                f'pool_kernel={self.pool_kernel}, normalize={self.normalize!r}, '
                f'grad_scale={self.grad_scale}, loss_weight={self.loss_weight}')

    @torch.no_grad()
    def ot_gradient(self, pred_fake_x0: Tensor, pred_real_x0: Tensor) -> Tensor:
        """Normalised OT gradient ĝ at full resolution, shape of the inputs, float32 (float64 for
        float64 inputs), no autograd graph. Also fills ``last_stats`` ('otd_step_norm' assumes ĝ is applied
        with loss_weight·grad_scale, as :meth:`forward` does)."""
        if pred_fake_x0.shape != pred_real_x0.shape:
            raise ValueError(f'OTDLoss: pred_fake_x0 {tuple(pred_fake_x0.shape)} and pred_real_x0 '
                             f'{tuple(pred_real_x0.shape)} must have the same shape')
        _check_inputs(pred_fake_x0=pred_fake_x0, pred_real_x0=pred_real_x0)
        shape = pred_fake_x0.shape
        compute = torch.float64 if pred_fake_x0.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=pred_fake_x0.device.type, enabled=False):
            a = frames_to_tokens(pred_fake_x0.detach().to(compute), self.pool_kernel)   # fake tokens
            b = frames_to_tokens(pred_real_x0.detach().to(compute), self.pool_kernel)   # real tokens
            mode = (dict(num_iters=self.num_iters) if self.tol is None else
                    dict(tol=self.tol, max_iters=self.max_iters, eps_scaling=self.eps_scaling))
            result = sinkhorn(a, b, self.epsilon, return_gradient=True, overrelaxation=self.overrelaxation,
                              backend=self.backend, block_elems=self.block_elems, precision=self.precision,
                              **mode)
            # g_i = Σ_j T*_ij (a_i − b_j) on tokens → full resolution by the pooling adjoint
            grad = tokens_to_frames_adjoint(result.gradient, shape, self.pool_kernel).to(compute)
            raw_norm = grad.norm()
            B, Fr = shape[0], shape[2]
            if self.normalize == 'l2_frame':
                # g / ‖g‖₂ over (C, H, W) of each batch element and frame
                norm = grad.square().sum(dim=(1, 3, 4), keepdim=True).sqrt()
                grad = grad / norm.clamp_min(self.norm_eps)
            elif self.normalize == 'mean_abs':
                scale = grad.abs().mean(dim=(1, 2, 3, 4), keepdim=True)
                grad = grad / scale.clamp_min(self.norm_eps)
        stats = {
            'otd_w_eps': float(result.dual_value.mean()),
            'otd_transport_cost': float(result.transport_cost.mean()),
            'otd_grad_norm': float(raw_norm),
            'otd_step_norm': abs(self.loss_weight * self.grad_scale) * float(grad.norm()),
            'otd_iters': float(result.iters),
            'otd_row_err': float(result.row_err.mean()),
            'otd_col_err': float(result.col_err.mean()),
            'otd_row_err_max': float(result.row_err.max()),
            'otd_col_err_max': float(result.col_err.max()),
            'otd_problems': float(B * Fr),
            'otd_exact_g_steps': float(result.exact_g_steps),
            'otd_float64': float(result.promoted),
            'otd_precision_ok': float(result.precision_ok),
        }
        if result.converged is not None:
            stats['otd_converged'] = float(result.converged)
        self.last_stats = stats
        return grad

    def forward(self, x: Tensor, pred_fake_x0: Tensor, pred_real_x0: Tensor) -> Tensor:
        """Surrogate scalar; its gradient flows only into x (= loss_weight · grad_scale · ĝ). Its value is not a
        loss curve: log ``last_stats`` ('otd_w_eps') instead."""
        if x.shape != pred_fake_x0.shape:
            raise ValueError(f'OTDLoss: x {tuple(x.shape)} and pred_fake_x0 {tuple(pred_fake_x0.shape)} '
                             'must have the same shape')
        _check_inputs(x=x, pred_fake_x0=pred_fake_x0, pred_real_x0=pred_real_x0)
        grad = self.ot_gradient(pred_fake_x0, pred_real_x0)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # L = 0.5 Σ (x − sg(x − c·g))²  →  ∂L/∂x = c·g
            return self.loss_weight * surrogate_loss(x, self.grad_scale * grad, reduction='sum')
