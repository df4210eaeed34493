# ruff: noqa: E402  (imports follow the sys.path set-up below)
"""Few-step distillation of an exact-score Gaussian-mixture teacher with the project's own losses.

What is the project's code and what is the toy's (docs/DESIGN.md §5, §6):

* objectives: ``vdot_ext.losses.DMDLoss``, ``OTDLoss`` (its batched log-domain ``vdot_ext.ot.sinkhorn``) and
  ``DenoisingLoss``, weighted by ``vdot_ext.losses.dm_weighting.distribution_matching_gradients``, the function
  the distiller calls, in 'parity' or 'balanced' mode; gradient statistics by ``gradient_stats``;
* schedule: ``vdot_ext.models.step_plans.vdot_step_plan`` (Algorithm 1 + TTUR: the critic every iteration, the
  generator every ``gen_every`` = 5, before the critic); time conventions from ``vdot_ext.models.flow_matching``
  (few-step timesteps [1000, 750, 500, 250] shifted by 5; score timesteps clamp(shift_s(U[20, 980])) as the
  distiller's default ``score_t_clamp='before_shift'``, s = ``ToyConfig.score_shift``: the recipe's 5, or 1);
  the rollout with a random exit step shared by the iteration's steps and fresh re-noising between steps, as
  ``VDOTDistiller.rollout``;
* toy: the teacher is the exact posterior mean of the mixture (``mixtures.Mixture.teacher_x0``); generator and
  fake score are small MLPs on (x_t, time features) predicting the velocity v (x0 = x_t − σ v). The fake score
  is the teacher plus a zero-initialised MLP residual, so fake = teacher at step 0, as the recipe's
  ``init_from_teacher``; the generator starts from random weights (the distributions start far apart, the
  regime in which the VDOT paper (§4.2, Fig. 2) says reverse KL zero-forces).

The batch is the point cloud. ``OTDLoss`` takes latents [B, C, F, H, W] and solves one OT problem per (b, f)
between the H·W/k² tokens; the toy passes its samples [S, N, d] as [S, d, 1, N, 1] with ``pool_kernel=1``, so
token n is sample n, channel c is coordinate c, and each of the S seeds (trained side by side, weights
[S, ...]) is one OT problem. Seeds never mix: every loss is per batch element except the mean reductions
(``DMDLoss``, balanced weighting, ``DenoisingLoss``), which divide by the numel of all S seeds; the losses'
``loss_weight`` = S undoes that, so each seed receives exactly the gradient of a run on its own
(``tests/test_toy_benchmark.py`` checks it). Parity's OT step is per problem (sum reduction): weight 1.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

# the checkout's vdot_ext (not an installed copy) and this folder's mixtures module
_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(os.path.dirname(_HERE)), _HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from mixtures import Mixture, mode_metrics, w2_exact

from vdot_ext.losses import DenoisingLoss, DMDLoss, OTDLoss
from vdot_ext.losses.dm_weighting import distribution_matching_gradients, gradient_stats
from vdot_ext.models.flow_matching import add_noise, few_step_timesteps, shift_timesteps, x0_from_velocity
from vdot_ext.models.step_plans import vdot_step_plan
from vdot_ext.utils import NonFiniteError

__all__ = ['VARIANTS', 'ToyConfig', 'EnsembleMLP', 'ToyDistillation', 'run']

# name: (OTD on, DMD on, dm_weighting)
VARIANTS = {
    'dmd': (False, True, 'parity'),             # DMD only (Self-Forcing); the weighting mode is irrelevant
    'otd_parity': (True, False, 'parity'),      # OTD only, the public code's normalised fixed-size step
    'otd_balanced': (True, False, 'balanced'),  # OTD only, displacement on DMD's scale, vanishes at fake = real
    'otd_dmd_parity': (True, True, 'parity'),   # VDOT 0.8·OTD + 0.2·DMD, public code
    'otd_dmd_balanced': (True, True, 'balanced'),
}

# generator exploding: samples beyond this many data radii count as a divergence
EXPLODE_FACTOR = 50.0


@dataclass
class ToyConfig:
    mixture: str = 'ring8'
    variant: str = 'dmd'
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    iterations: int = 3000          # critic steps; the generator steps iterations / gen_every times
    gen_every: int = 5              # TTUR (VDOT Algorithm 1 / DMD2)
    batch: int = 128                # samples per iteration per seed = tokens of the seed's OT problem
    hidden: int = 64
    layers: int = 3
    lr_generator: float = 3e-3
    lr_critic: float = 3e-3
    betas: tuple = (0.0, 0.999)     # the recipe's Adam betas
    dm_weights: Optional[Dict[str, float]] = None   # None: the distiller's (0.8/0.2 with both terms, else 1)
    generator_timesteps: tuple = (1000.0, 750.0, 500.0, 250.0)
    generator_shift: float = 5.0
    score_shift: float = 5.0
    min_t: float = 20.0
    max_t: float = 980.0
    eval_every: int = 600
    eval_samples: int = 1000        # W2 and mode metrics over training (the curves)
    final_samples: int = 2000       # ... at the end (the table)
    otd_overrides: Dict = field(default_factory=dict)   # OTDLoss(**...) beyond the defaults


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[σ, sin(πkσ), cos(πkσ) for k = 1..3] for timesteps t (any shape) → [..., 7]."""
    sigma = t / 1000.0
    k = torch.arange(1, 4, dtype=sigma.dtype, device=sigma.device)
    arg = math.pi * sigma[..., None] * k
    return torch.cat([sigma[..., None], arg.sin(), arg.cos()], dim=-1)


class EnsembleMLP(nn.Module):
    """S independent MLPs evaluated with batched matmuls: x [S, N, in] → [S, N, out].

    Member s is initialised like ``nn.Linear`` (U(±1/√fan_in)) from its own generator; ``zero_last`` starts the
    output at 0 (the fake score's residual)."""

    def __init__(self, members: int, sizes: List[int], generators: List[torch.Generator], zero_last=False):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.stack([(torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound for g in generators])
            b = torch.stack([(torch.rand(1, fan_out, generator=g) * 2 - 1) * bound for g in generators])
            if zero_last and i == len(sizes) - 2:
                w.zero_()
                b.zero_()
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = nn.functional.silu(x)
        return x


def to_latents(x: torch.Tensor) -> torch.Tensor:
    """[S, N, d] samples → [S, d, 1, N, 1] 'latents' (channels = coordinates, tokens = samples)."""
    return x.permute(0, 2, 1).unsqueeze(2).unsqueeze(-1)


def from_latents(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(-1).squeeze(2).permute(0, 2, 1)


class ToyDistillation:
    """Generator, fake score and objectives for S seeds side by side (see the module docstring)."""

    def __init__(self, cfg: ToyConfig, mixture: Mixture):
        if cfg.variant not in VARIANTS:
            raise ValueError(f'benchmarks/toy: unknown variant {cfg.variant!r}; expected one of {sorted(VARIANTS)}')
        self.cfg, self.mixture = cfg, mixture
        S, d = len(cfg.seeds), mixture.dim
        self.S = S
        gens = [torch.Generator().manual_seed(1000 * s + 1) for s in cfg.seeds]
        sizes = [d + 7] + [cfg.hidden] * cfg.layers + [d]
        self.generator = EnsembleMLP(S, sizes, gens)
        self.fake_residual = EnsembleMLP(S, sizes, gens, zero_last=True)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=cfg.betas)
        self.opt_c = torch.optim.Adam(self.fake_residual.parameters(), lr=cfg.lr_critic, betas=cfg.betas)
        use_otd, use_dmd, self.weighting = VARIANTS[cfg.variant]
        # loss_weight = S: the mean reductions divide by the numel of all S seeds (module docstring)
        self.dmd_loss = DMDLoss(loss_weight=float(S)) if use_dmd else None
        self.otd_loss = None
        if use_otd:
            otd = dict(pool_kernel=1, normalize='l2_frame' if self.weighting == 'parity' else 'none')
            otd.update(cfg.otd_overrides)
            otd['loss_weight'] = float(S) if self.weighting == 'balanced' else 1.0
            self.otd_loss = OTDLoss(**otd)
        self.denoising_loss = DenoisingLoss(loss_weight=float(S))
        weights = dict(otd=0.8, dmd=0.2) if (use_otd and use_dmd) else dict(otd=1.0, dmd=1.0)
        weights.update(cfg.dm_weights or {})
        self.dm_weights = weights
        self.steps = few_step_timesteps(cfg.generator_timesteps, cfg.generator_shift)
        self.noise = torch.Generator().manual_seed(7919 + 31 * cfg.seeds[0])
        self.diverged = torch.zeros(S, dtype=torch.bool)

    # --- networks ------------------------------------------------------------------------------------
    def _inputs(self, x_t, t):
        feats = time_features(t.float())[:, None, :].expand(x_t.shape[0], x_t.shape[1], -1)
        return torch.cat([x_t, feats], dim=-1)

    def teacher_x0(self, x_t, t):
        return self.mixture.teacher_x0(x_t, t[:, None]).float()

    def teacher_velocity(self, x_t, t):
        return (x_t - self.teacher_x0(x_t, t)) / (t / 1000.0)[:, None, None]

    def fake_velocity(self, x_t, t):
        """v_fake = v_teacher + residual: the fake score starts as the teacher (init_from_teacher)."""
        return self.teacher_velocity(x_t, t) + self.fake_residual(self._inputs(x_t, t))

    def fake_x0(self, x_t, t):
        return x0_from_velocity(x_t, self.fake_velocity(x_t, t), t)

    def generator_x0(self, x_t, t):
        return x0_from_velocity(x_t, self.generator(self._inputs(x_t, t)), t)

    def randn(self, *shape, generator: Optional[torch.Generator] = None):
        return torch.randn(*shape, generator=self.noise if generator is None else generator)

    def rollout(self, exit_step: int, grad: bool, n: Optional[int] = None, noise=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``VDOTDistiller.rollout``: x0 at ``exit_step``; earlier steps without gradients, re-noised with fresh
        noise to the next timestep (from ``generator``; default the training stream)."""
        S, d = self.S, self.mixture.dim
        x = self.randn(S, n or self.cfg.batch, d, generator=generator) if noise is None else noise
        for i in range(exit_step + 1):
            t = self.steps[i].expand(S)
            with torch.set_grad_enabled(grad and i == exit_step):
                x0 = self.generator_x0(x, t)
            if i == exit_step:
                return x0
            x = add_noise(x0.detach(), self.randn(*x.shape, generator=generator), self.steps[i + 1].expand(S))
        raise AssertionError('unreachable')

    def sample_t(self) -> torch.Tensor:
        """Score timesteps, ``VDOTDistiller.sample_t('score')`` with score_t_clamp='before_shift'."""
        u = self.cfg.min_t + (self.cfg.max_t - self.cfg.min_t) * torch.rand(self.S, generator=self.noise)
        return shift_timesteps(u, self.cfg.score_shift).clamp(self.cfg.min_t, self.cfg.max_t)

    # --- steps ---------------------------------------------------------------------------------------
    def _mark_diverged(self, x0: torch.Tensor) -> None:
        scale = float(self.mixture.means.norm(dim=1).max() + 3 * self.mixture.stds.max())
        bad = ~torch.isfinite(x0).flatten(1).all(1) | (x0.detach().abs().flatten(1).amax(1) > EXPLODE_FACTOR * scale)
        self.diverged |= bad

    def generator_step(self, exit_step: int) -> Dict[str, float]:
        """One distribution-matching step: the distiller's ``generator_losses(cond, 'dm', ...)``."""
        x0 = self.rollout(exit_step, grad=True)
        self._mark_diverged(x0)
        alive = ~self.diverged
        # a diverged seed is frozen: its samples are replaced by zeros so the batched losses stay finite
        x0_safe = torch.where(alive[:, None, None], x0.detach(), torch.zeros_like(x0))
        t = self.sample_t()
        x_t = add_noise(x0_safe, self.randn(*x0.shape), t)
        with torch.no_grad():
            pred_fake = self.fake_x0(x_t, t)
            pred_real = self.teacher_x0(x_t, t)
        pred_fake = torch.where(torch.isfinite(pred_fake), pred_fake, torch.zeros_like(pred_fake))
        grads, stats = self.dm_gradients(x0_safe, pred_fake, pred_real, t)
        total = sum(grads.values())
        step = total * alive[:, None, None]
        self.opt_g.zero_grad(set_to_none=True)
        (x0 * step).sum().backward()          # ⟨x̂0, sg(g)⟩: parameter gradient J_θᵀ g
        self._zero_dead_grads(self.generator)
        self.opt_g.step()
        return stats

    def dm_gradients(self, x0: torch.Tensor, pred_fake: torch.Tensor, pred_real: torch.Tensor, t: torch.Tensor):
        """The gradient each term puts on the samples x0 [S, N, d] (dict of [S, N, d]) and the statistics, from
        ``distribution_matching_gradients`` on the samples laid out as latents [S, d, 1, N, 1]."""
        x = to_latents(x0.detach()).requires_grad_(True)
        _, grads, stats = distribution_matching_gradients(
            x, to_latents(pred_fake), to_latents(pred_real), t, self.otd_loss, self.dmd_loss, self.dm_weights,
            self.weighting)
        stats = {k: v for k, v in stats.items() if isinstance(v, float)}
        stats.update(gradient_stats(grads))
        return {name: from_latents(g) for name, g in grads.items()}, stats

    def critic_step(self, exit_step: int) -> float:
        """Fake-score denoising on generator samples (``critic_losses(cond, 'denoise', ...)``)."""
        with torch.no_grad():
            x0 = self.rollout(exit_step, grad=False)
        alive = ~self.diverged & torch.isfinite(x0).flatten(1).all(1)
        x0 = torch.where(alive[:, None, None], x0, torch.zeros_like(x0))
        t = self.sample_t()
        noise = self.randn(*x0.shape)
        v = self.fake_velocity(add_noise(x0, noise, t), t)
        v = torch.where(alive[:, None, None], v, (noise - x0).detach())   # a dead seed contributes 0
        loss = self.denoising_loss(v, x0, noise, t)
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        self._zero_dead_grads(self.fake_residual)
        self.opt_c.step()
        return float(loss.detach()) / self.S

    def _zero_dead_grads(self, module: nn.Module) -> None:
        if bool(self.diverged.any()):
            for p in module.parameters():
                if p.grad is not None:
                    p.grad[self.diverged] = 0.0
                    p.grad.nan_to_num_(0.0)

    @torch.no_grad()
    def evaluate(self, noise: torch.Tensor, reference: torch.Tensor) -> List[Dict[str, float]]:
        """Metrics per seed of the full 4-step rollout from fixed ``noise`` [S, n, d] against teacher samples.
        The re-noising uses its own fixed stream: evaluating neither changes training nor varies between
        checkpoints."""
        renoise = torch.Generator().manual_seed(4242)
        x0 = self.rollout(len(self.steps) - 1, grad=False, noise=noise, generator=renoise)
        self._mark_diverged(x0)
        out = []
        for s in range(self.S):
            if bool(self.diverged[s]):
                out.append(dict(diverged=1.0))
                continue
            m = mode_metrics(self.mixture, x0[s])
            m['w2'] = w2_exact(x0[s], reference[:noise.shape[1]])
            m['diverged'] = 0.0
            out.append(m)
        return out


def run(cfg: ToyConfig, mixture: Mixture, reference: torch.Tensor, log=None) -> dict:
    """Train all seeds of ``cfg`` and return the metric history (JSON-ready)."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    toy = ToyDistillation(cfg, mixture)
    eval_gen = torch.Generator().manual_seed(99)
    eval_noise = torch.randn(toy.S, cfg.final_samples, mixture.dim, generator=eval_gen)
    history, gen_stats, nonfinite_skips = [], [], 0
    gen_step = 0
    for k in range(cfg.iterations + 1):
        if k % cfg.eval_every == 0 or k == cfg.iterations:
            history.append(dict(iteration=k, generator_steps=gen_step,
                                seeds=toy.evaluate(eval_noise[:, :cfg.eval_samples], reference)))
            if log:
                log(cfg, history[-1])
        if k == cfg.iterations:
            break
        plan = vdot_step_plan(k, cfg.gen_every, gan=False, dm=True)
        exit_step = int(torch.randint(len(toy.steps), (1, ), generator=toy.noise))
        for step in plan.steps:
            try:
                if step.role == 'generator':
                    gen_stats.append(toy.generator_step(exit_step))
                    gen_step += 1
                else:
                    toy.critic_step(exit_step)
            except NonFiniteError:
                nonfinite_skips += 1              # the guarded step's behaviour: skip, count
    keys = sorted({key for s in gen_stats for key in s})
    mean_stats = {key: sum(s.get(key, 0.0) for s in gen_stats) / max(len(gen_stats), 1) for key in keys}
    final = toy.evaluate(eval_noise, reference)
    losses = {name: repr(loss) for name, loss in (('otd', toy.otd_loss), ('dmd', toy.dmd_loss),
                                                  ('denoising', toy.denoising_loss)) if loss is not None}
    return dict(config=asdict(cfg), history=history, final=final, losses=losses, mean_generator_stats=mean_stats,
                nonfinite_skips=nonfinite_skips, diverged=toy.diverged.tolist(),
                wall_s=time.perf_counter() - start_wall, cpu_s=time.process_time() - start_cpu)
