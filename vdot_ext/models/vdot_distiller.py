"""VDOT distillation model: generator, real/fake score, discriminator (DESIGN.md §3, §6).

One class serves both stages; the config decides which objectives are on:

* stage 1 (Wan T2V, captions only): DMD on the generator, denoising on the critic;
* stage 2 (VACE, VCU data): ``0.8·OTD + 0.2·DMD`` / GAN, alternating (Algorithm 1
  of the VDOT paper) with the TTUR of DMD2 (generator every ``gen_every`` steps).

Every role steps through :class:`~vdot_ext.models.guarded_step.NonFiniteGuard`: a step
whose loss or gradients are not finite is skipped, counted and logged with the batch's
sample ids (docs/DESIGN.md §11).
"""
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModel

from vdot_ext.registry import MODELS

from .checkpoint_io import check_state_dict
from .flow_matching import (add_noise, few_step_timesteps, sample_timesteps,
                            x0_from_velocity)
from .guarded_step import NonFiniteGuard
from .weights import load_weights


@dataclass(frozen=True)
class StepPlan:
    """What iteration ``k`` does: which objective each role steps with.

    ``generator`` is ``'dm'`` (OTD/DMD), ``'gan'`` or ``None`` (no update);
    ``critic`` is ``'denoise'`` (fake score) or ``'gan'`` (discriminator).
    """
    iteration: int
    generator: Optional[str]
    critic: str


def vdot_step_plan(k: int, gen_every: int, gan: bool, dm: bool) -> StepPlan:
    """Algorithm 1 + TTUR (DESIGN.md §6).

    The critic steps every iteration, the generator every ``gen_every``.
    With the GAN on, even k is distribution matching (generator OTD/DMD,
    critic denoising) and odd k adversarial (generator and discriminator GAN).
    """
    adversarial = gan and k % 2 == 1
    critic = 'gan' if adversarial else 'denoise'
    generator = None
    if k % gen_every == 0:
        generator = 'gan' if adversarial else ('dm' if dm else None)
    return StepPlan(k, generator, critic)


@MODELS.register_module()
class VDOTDistiller(BaseModel):
    """Few-step video generator distilled with DMD, OTD and a register-token GAN.

    Roles (DESIGN.md §3): ``generator`` G_θ (trainable), ``real_score`` F_ψ
    (frozen teacher), ``fake_score`` F_φ (trainable critic) and
    ``discriminator`` D_τ (trainable, reads F_φ's hidden states). The trainable
    roles seen by the optimizer are ``generator`` and ``critic`` (F_φ + D_τ).

    Args:
        generator: config of the generator (a ``WanVACEScore``); defaults to
            ``real_score``'s config.
        real_score: config of the teacher.
        fake_score: config of the fake score; defaults to ``real_score``'s.
        discriminator: ``RegisterTokenDiscriminator`` config or None (no GAN).
            ``model_dim``/``model_depth`` are filled from the fake score.
        real_score_weights: ``dict(checkpoint=..., prefix=..., ignore=[...])``
            to load the teacher from an mmengine/torch checkpoint (the
            ``pretrained`` field of the score config loads released weights).
        init_from_teacher: initialise generator and fake score with the
            teacher's weights (Algorithm 1, "Init").
        generator_init: an initialiser applied to the generator afterwards,
            e.g. ``dict(type='VACEAccWanInit', source=...)``.
        generator_lora, fake_score_lora: ``dict(type='LoRAAdapter', rank=...)``
            to train LoRA adapters (peft) instead of the full role; applied
            after all weights are loaded.
        dmd_loss, otd_loss, denoising_loss, gan_loss: loss configs; None
            switches the term off (ablations are config changes).
        dm_weights: weights of OTD and DMD in the generator's distribution
            matching objective (public VDOT code: 0.8 / 0.2).
        gen_every: TTUR ratio (generator steps once per ``gen_every``).
        generator_timesteps: the few-step schedule before shifting.
        generator_shift: shift applied to ``generator_timesteps``.
        score_shift, gan_shift, min_t, max_t: timestep sampling (§4).
        guidance_scale: teacher CFG ``v = v_u + w (v_c − v_u)``; 1 = no CFG.
        use_vace_context: feed ``vace_context`` from the data to all scores.
        seed: seeds the rollout's exit step (identical on all ranks).
        max_consecutive_nonfinite: a role whose step is skipped this many times in a
            row (non-finite loss or gradients) stops training with ``RuntimeError``.
            Consecutive counts the role's own steps: the generator's are
            ``gen_every`` iterations apart.
    """

    TRAINABLE_ROLES = ('generator', 'critic')

    def __init__(self,
                 real_score: dict,
                 generator: Optional[dict] = None,
                 fake_score: Optional[dict] = None,
                 discriminator: Optional[dict] = None,
                 real_score_weights: Optional[dict] = None,
                 init_from_teacher: bool = True,
                 generator_init: Optional[dict] = None,
                 generator_lora: Optional[dict] = None,
                 fake_score_lora: Optional[dict] = None,
                 dmd_loss: Optional[dict] = dict(type='DMDLoss'),
                 otd_loss: Optional[dict] = None,
                 denoising_loss: Optional[dict] = dict(type='DenoisingLoss'),
                 gan_loss: Optional[dict] = None,
                 dm_weights: Optional[dict] = None,
                 gen_every: int = 5,
                 generator_timesteps: Sequence[float] = (1000, 750, 500, 250),
                 generator_shift: float = 5.0,
                 score_shift: float = 5.0,
                 gan_shift: float = 12.0,
                 min_t: float = 20.0,
                 max_t: float = 980.0,
                 guidance_scale: float = 1.0,
                 use_vace_context: bool = True,
                 seed: int = 0,
                 max_consecutive_nonfinite: int = 10,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if gen_every < 1:
            raise ValueError(f'VDOTDistiller.gen_every must be >= 1, got {gen_every}')
        if denoising_loss is None:
            raise ValueError('VDOTDistiller.denoising_loss is required: the fake '
                             'score must track the generator (DMD/OTD need it)')

        # --- roles -----------------------------------------------------
        self.real_score = MODELS.build(real_score)
        if real_score_weights is not None:
            load_weights(self.real_score, **real_score_weights,
                         field='model.real_score_weights')
        self.real_score.requires_grad_(False).eval()
        self.fake_score = MODELS.build(copy.deepcopy(fake_score or real_score))
        self.generator = MODELS.build(copy.deepcopy(generator or real_score))
        if init_from_teacher:
            teacher_sd = self.real_score.state_dict()
            for name in ('fake_score', 'generator'):
                _copy_matching(getattr(self, name), teacher_sd, name)
        self.generator_init_report = None
        if generator_init is not None:
            initializer = MODELS.build(generator_init)
            self.generator_init_report = initializer(self.generator)
        # peft LoRA after all weights are loaded, so adapters start at zero on
        # top of the initialised student
        self.lora_reports = {}
        for name, lora_cfg in (('generator', generator_lora), ('fake_score', fake_score_lora)):
            if lora_cfg is not None:
                self.lora_reports[name] = MODELS.build(lora_cfg)(getattr(self, name))

        self.discriminator = None
        if discriminator is not None:
            disc_cfg = dict(discriminator)
            disc_cfg.setdefault('model_dim', self.fake_score.dim)
            disc_cfg.setdefault('model_depth', self.fake_score.num_layers)
            self.discriminator = MODELS.build(disc_cfg)

        # --- objectives --------------------------------------------------
        self.dmd_loss = MODELS.build(dmd_loss) if dmd_loss else None
        self.otd_loss = MODELS.build(otd_loss) if otd_loss else None
        self.denoising_loss = MODELS.build(denoising_loss)
        self.gan_loss = MODELS.build(gan_loss) if gan_loss else None
        if (self.gan_loss is None) != (self.discriminator is None):
            raise ValueError('VDOTDistiller: gan_loss and discriminator must be '
                             'given together (both None switches the GAN off)')
        weights = dict(otd=0.8, dmd=0.2) if (self.otd_loss and self.dmd_loss) \
            else dict(otd=1.0, dmd=1.0)
        weights.update(dm_weights or {})
        unknown = set(weights) - {'otd', 'dmd'}
        if unknown:
            raise ValueError(f'VDOTDistiller.dm_weights: unknown keys {sorted(unknown)}; '
                             "expected 'otd' and/or 'dmd'")
        self.dm_weights = weights

        self.gen_every = gen_every
        self.register_buffer(
            'generator_timesteps',
            few_step_timesteps(generator_timesteps, generator_shift),
            persistent=False)
        self.score_shift = score_shift
        self.gan_shift = gan_shift
        self.min_t, self.max_t = min_t, max_t
        self.guidance_scale = guidance_scale
        self.use_vace_context = use_vace_context
        self.seed = seed
        # iteration counter: saved with the weights so a resumed run continues
        # the Algorithm-1 schedule where it stopped
        self.register_buffer('iteration', torch.zeros((), dtype=torch.long))
        # skip counters per role: buffers too, so they survive resume
        self.nonfinite_guard = NonFiniteGuard(self.TRAINABLE_ROLES, max_consecutive_nonfinite,
                                              owner='VDOTDistiller')
        self.schedule_trace: List[StepPlan] = []

    # ------------------------------------------------------------------
    # roles, for optimizers and strategies
    # ------------------------------------------------------------------
    def trainable_roles(self) -> Dict[str, List[nn.Module]]:
        critic = [self.fake_score]
        if self.discriminator is not None:
            critic.append(self.discriminator)
        return {'generator': [self.generator], 'critic': critic}

    def _critic_modules(self) -> Dict[str, nn.Module]:
        """The critic's modules by attribute name (to name parameters in messages)."""
        named = dict(fake_score=self.fake_score)
        if self.discriminator is not None:
            named['discriminator'] = self.discriminator
        return named

    def frozen_roles(self) -> Dict[str, nn.Module]:
        return {'real_score': self.real_score}

    def role_param_groups(self, role: str) -> List[dict]:
        if role == 'generator':
            return [dict(name='generator', params=list(self.generator.parameters()))]
        if role == 'critic':
            groups = [dict(name='fake_score', params=list(self.fake_score.parameters()))]
            if self.discriminator is not None:
                groups.append(dict(name='discriminator',
                                   params=list(self.discriminator.parameters())))
            return groups
        raise KeyError(f'unknown role {role!r}; roles are {self.TRAINABLE_ROLES}')

    def plan(self, k: int) -> StepPlan:
        dm = self.dmd_loss is not None or self.otd_loss is not None
        return vdot_step_plan(k, self.gen_every, self.gan_loss is not None, dm)

    # ------------------------------------------------------------------
    # conditioning and sampling
    # ------------------------------------------------------------------
    def _conditions(self, data: dict) -> dict:
        for key in ('context', 'latents'):
            if key not in data:
                raise KeyError(f'VDOTDistiller.train_step: the data batch has no '
                               f'{key!r} (keys: {sorted(data)})')
        context = data['context']
        cond = dict(context=context,
                    negative_context=data.get('negative_context',
                                              torch.zeros_like(context)),
                    vace_context=None,
                    shape=tuple(data['latents'].shape),
                    real_latents=data['latents'])
        if self.use_vace_context:
            if data.get('vace_context') is None:
                raise KeyError('VDOTDistiller(use_vace_context=True): the data batch '
                               "has no 'vace_context'")
            cond['vace_context'] = data['vace_context']
        return cond

    def _score_x0(self, score, x_t, t, cond, **kw):
        return score.predict_x0(x_t, t, cond['context'], cond['vace_context'], **kw)

    def teacher_x0(self, x_t, t, cond):
        """Teacher x0 with classifier-free guidance on the text (§4)."""
        v = self.real_score(x_t, t, cond['context'], cond['vace_context'])
        if self.guidance_scale != 1.0:
            v_u = self.real_score(x_t, t, cond['negative_context'], cond['vace_context'])
            v = v_u.float() + self.guidance_scale * (v.float() - v_u.float())
        return x0_from_velocity(x_t.float(), v.float(), t)

    def exit_step(self, k: int) -> int:
        """The rollout's exit step at iteration k: a function of (seed, k) only,
        so every rank draws the same one without communication."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        return int(torch.randint(len(self.generator_timesteps), (1, ), generator=g))

    def rollout(self, cond: dict, exit_step: Optional[int] = None,
                grad: bool = False) -> torch.Tensor:
        """Backward simulation of the few-step sampler (Self-Forcing / DMD2).

        Runs the sampler from noise; at ``exit_step`` returns the generator's
        x0 (with gradients if ``grad``). Steps before it run without
        gradients and re-noise x0 to the next timestep with fresh noise.
        ``exit_step=None`` runs all steps (inference).
        """
        steps = self.generator_timesteps
        last = len(steps) - 1 if exit_step is None else exit_step
        ref = cond['context']
        x = cond.get('noise')
        x = torch.randn(cond['shape'], device=ref.device, dtype=torch.float32) \
            if x is None else x.float()
        batch = x.shape[0]
        for i in range(last + 1):
            t = steps[i].expand(batch).to(ref.device)
            with torch.set_grad_enabled(grad and i == last):
                x0 = self._score_x0(self.generator, x, t, cond)
            if i == last:
                return x0
            noise = torch.randn_like(x)
            x = add_noise(x0.detach(), noise, steps[i + 1].expand(batch))
        raise AssertionError('unreachable')

    @torch.no_grad()
    def generate(self, context, vace_context=None, shape=None, noise=None):
        """Few-step generation (all steps) from ``noise`` (or fresh noise of
        ``shape``), e.g. for samples."""
        if noise is None and shape is None:
            raise ValueError('VDOTDistiller.generate needs noise or shape')
        cond = dict(context=context, vace_context=vace_context, noise=noise,
                    shape=tuple(noise.shape if noise is not None else shape))
        return self.rollout(cond, exit_step=None, grad=False)

    def _sample_t(self, batch: int, shift: float, device) -> torch.Tensor:
        return sample_timesteps(batch, shift, self.min_t, self.max_t).to(device)

    def _disc_logits(self, x_t, t, cond):
        _, feats = self.fake_score(x_t, t, cond['context'], cond['vace_context'],
                                   return_hidden_at=self.discriminator.taps)
        return self.discriminator(feats.hidden, feats.time_emb)

    # ------------------------------------------------------------------
    # objectives
    # ------------------------------------------------------------------
    def generator_losses(self, cond: dict, objective: str, exit_step: int):
        """Generator losses for ``objective`` ('dm' or 'gan') and OT/DMD stats."""
        x0 = self.rollout(cond, exit_step, grad=True)
        batch, device = x0.shape[0], x0.device
        losses, stats = {}, {}
        if objective == 'dm':
            # score both networks on the same noisy sample of the detached x0
            t = self._sample_t(batch, self.score_shift, device)
            x_t = add_noise(x0.detach(), torch.randn_like(x0), t)
            with torch.no_grad():
                pred_fake = self._score_x0(self.fake_score, x_t, t, cond).float()
                pred_real = self.teacher_x0(x_t, t, cond)
            if self.otd_loss is not None:
                losses['loss_gen_otd'] = self.dm_weights['otd'] * self.otd_loss(
                    x0, pred_fake, pred_real)
                stats.update(self.otd_loss.last_stats)
            if self.dmd_loss is not None:
                losses['loss_gen_dmd'] = self.dm_weights['dmd'] * self.dmd_loss(
                    x0, pred_fake, pred_real, t)
                stats.update(self.dmd_loss.last_stats)
        elif objective == 'gan':
            # real and fake noised at the same GAN timestep (eq. 11)
            t = self._sample_t(batch, self.gan_shift, device)
            x_t_fake = add_noise(x0, torch.randn_like(x0), t)
            x_t_real = add_noise(cond['real_latents'].float(), torch.randn_like(x0), t)
            logits_fake = self._disc_logits(x_t_fake, t, cond)
            with torch.no_grad():
                logits_real = self._disc_logits(x_t_real, t, cond)
            losses['loss_gen_gan'] = self.gan_loss(logits_fake, logits_real, 'generator')
        else:
            raise ValueError(f'unknown generator objective {objective!r}')
        return losses, stats

    def critic_losses(self, cond: dict, objective: str, exit_step: int) -> dict:
        """Fake-score denoising loss or discriminator GAN loss."""
        with torch.no_grad():
            x0 = self.rollout(cond, exit_step, grad=False).float()
        batch, device = x0.shape[0], x0.device
        if objective == 'denoise':
            t = self._sample_t(batch, self.score_shift, device)
            noise = torch.randn_like(x0)
            v = self.fake_score(add_noise(x0, noise, t), t, cond['context'],
                                cond['vace_context'])
            return {'loss_critic_denoise': self.denoising_loss(v, x0, noise)}
        if objective == 'gan':
            # Algorithm 1, line 22: only the discriminator τ is updated; the fake
            # score supplies hidden states without gradients.
            t = self._sample_t(batch, self.gan_shift, device)
            x_t_fake = add_noise(x0, torch.randn_like(x0), t)
            x_t_real = add_noise(cond['real_latents'].float(), torch.randn_like(x0), t)
            with torch.no_grad():
                feats = [self.fake_score(x, t, cond['context'], cond['vace_context'],
                                         return_hidden_at=self.discriminator.taps)[1]
                         for x in (x_t_fake, x_t_real)]
            logits_fake, logits_real = (self.discriminator(f.hidden, f.time_emb)
                                        for f in feats)
            return {'loss_critic_gan': self.gan_loss(logits_fake, logits_real,
                                                     'discriminator')}
        raise ValueError(f'unknown critic objective {objective!r}')

    # ------------------------------------------------------------------
    # mmengine interface
    # ------------------------------------------------------------------
    def _set_trainable(self, role: Optional[str]):
        """Only ``role``'s modules require grad (None freezes all)."""
        from .lora import set_requires_grad  # keeps LoRA base weights frozen
        for name, modules in self.trainable_roles().items():
            for module in modules:
                set_requires_grad(module, name == role)

    def train_step(self, data, optim_wrapper) -> Dict[str, torch.Tensor]:
        """One iteration of Algorithm 1: maybe a generator step, then a critic step.

        ``optim_wrapper`` is an ``OptimWrapperDict`` with ``generator`` and
        ``critic`` entries. Each step is guarded (docs/DESIGN.md §11): a non-finite
        loss or gradient skips that role's update. Returns every finite loss term
        and OT statistic computed, and ``nonfinite_skips_<role>`` (total skips).

        The ``iteration`` counter advances on every call, skipped steps included:
        the schedule and the exit step are functions of the number of batches
        consumed, so a run with skips keeps the same plan as one without, and a
        resumed run continues it exactly.
        """
        data = self.data_preprocessor(data, True)
        cond = self._conditions(data)
        k = int(self.iteration.item())
        plan = self.plan(k)
        exit_step = self.exit_step(k)
        log: Dict[str, torch.Tensor] = {}
        guard = self.nonfinite_guard
        try:
            if plan.generator is not None:
                self._set_trainable('generator')
                done = guard.step(
                    'generator', optim_wrapper['generator'], self.generator,
                    lambda: self.generator_losses(cond, plan.generator, exit_step),
                    data=data, iteration=k, named_modules=dict(generator=self.generator))
                log.update(done.losses)
                log.update({k_: torch.tensor(float(v)) for k_, v in done.stats.items()})
                log['gen_exit_step'] = torch.tensor(float(exit_step))

            self._set_trainable('critic')
            done = guard.step(
                'critic', optim_wrapper['critic'], self.fake_score,
                lambda: (self.critic_losses(cond, plan.critic, exit_step), {}),
                data=data, iteration=k, named_modules=self._critic_modules())
            log.update(done.losses)
        finally:
            self._set_trainable(None)

        self.schedule_trace.append(plan)
        self.iteration += 1
        log.update(guard.log_vars())
        return log

    def forward(self, context, vace_context=None, latents=None, mode='tensor', **kwargs):
        """mmengine's forward: ``mode='tensor'`` returns few-step samples
        shaped like ``latents``."""
        if mode != 'tensor':
            raise ValueError(f"VDOTDistiller.forward supports mode='tensor' only "
                             f'(training goes through train_step), got {mode!r}')
        if latents is None:
            raise ValueError('VDOTDistiller.forward needs latents (for the shape)')
        return self.generate(context, vace_context if self.use_vace_context else None,
                             latents.shape)


def _copy_matching(module: nn.Module, source_sd: dict, name: str) -> None:
    """Load the teacher's weights into ``module`` where the keys exist in both.

    A T2V generator initialised from a VACE teacher takes its DiT keys; keys
    the module has but the teacher lacks are an error (nothing stays random
    silently)."""
    own = module.state_dict()
    picked = {k: source_sd[k] for k in own if k in source_sd}
    check_state_dict(module, picked, 'the teacher (real_score)',
                     f'{name} (give it the architecture of real_score or set '
                     'init_from_teacher=False)')
    module.load_state_dict(picked, strict=True)
    skipped = len(source_sd) - len(picked)
    if skipped:
        print_log(f'{name}: initialised from the teacher ({len(own)} tensors; '
                  f'{skipped} teacher tensors not used by this architecture)',
                  logger='current')
