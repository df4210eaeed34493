"""VDOT distillation model: generator, real/fake score, discriminator (docs/DESIGN.md §3, §5, §6).

One class serves both stages; the config decides which objectives are on:

* stage 1 (Wan T2V, captions only): DMD on the generator, denoising on the critic;
* stage 2 (VACE, VCU data): ``0.8·OTD + 0.2·DMD`` / GAN, alternating (Algorithm 1
  of the VDOT paper) with the TTUR of DMD2 (generator every ``gen_every`` steps).

What runs at iteration k is a step plan from the config's ``schedule`` (:mod:`.step_plans`;
Algorithm 1 by default, or any cyclic list of steps such as MoGAN's order). Every step steps
its role through :class:`~vdot_ext.models.guarded_step.NonFiniteGuard`: a step whose loss or
gradients are not finite is skipped, counted and logged with the batch's sample ids
(docs/DESIGN.md §11).

Generator steps measure the gradient each objective puts on the generator sample x̂0 before
it reaches the generator (docs/DESIGN.md §5, "What the logs show"): the term is evaluated at
a detached copy x of x̂0, its gradient g = ∂L/∂x is taken there, and the generator is
back-propagated with the linear surrogate ⟨x̂0, sg(g)⟩, whose parameter gradient J_θᵀ g is
the chain rule of the original term exactly. So the logs can report ‖g‖, cosines and shares
of every term at no extra backward pass, and the balanced weighting can act on g.
"""
import collections
import copy
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModel

# the weighting of the distribution-matching terms lives with the losses (the toy benchmark calls it too)
from vdot_ext.losses.dm_weighting import DM_WEIGHTINGS, distribution_matching_gradients, gradient_stats
from vdot_ext.losses.dm_weighting import check_finite_gradient as _nonfinite
from vdot_ext.registry import MODELS

from .checkpoint_io import check_state_dict
from .flow_matching import add_noise, few_step_timesteps, sample_timesteps, shift_timesteps, x0_from_velocity
from .guarded_step import GuardedStep, NonFiniteGuard
from .step_plans import Step, StepPlan, StepSchedule, VDOTAlgorithm1, build_schedule, vdot_step_plan
from .weights import load_weights

__all__ = ['VDOTDistiller', 'StepPlan', 'Step', 'vdot_step_plan', 'distribution_matching_gradients',
           'gradient_stats']

GAN_CRITIC_TRAINS = ('fake_score_and_heads', 'heads')
SCORE_T_CLAMPS = ('before_shift', 'after_shift')
UNCONDS = ('negative_prompt', 'zeros')


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f'VDOTDistiller.{name} (model.{name}) must be one of {allowed}, got {value!r}')
    return value


@MODELS.register_module()
class VDOTDistiller(BaseModel):
    """Few-step video generator distilled with DMD, OTD and a register-token GAN.

    Roles (docs/DESIGN.md §3): ``generator`` G_θ (trainable), ``real_score`` F_ψ
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
        dm_weighting: 'balanced' (default: both terms as displacements on DMD's scale, so the weights weigh
            commensurable steps and the OT step vanishes when fake = real; needs ``otd_loss.normalize='none'``)
            or 'parity' (the public code: each term at its native scale, OTD as a fixed-size normalised step).
            Formulas: :func:`distribution_matching_gradients`. The default was chosen by measurement
            (benchmarks/RESULTS.md, "Exact-score toy"): parity was the only weighting that lost modes and
            raised W2 against DMD alone (0 of 5 seeds better on two mixtures); balanced matched DMD within
            the seed spread (docs/DESIGN.md §12).
        balanced_ot_debias: balanced only: remove the entropic self-bias of the OT displacement (one more
            Sinkhorn solve, of the fake cloud onto itself).
        schedule: the step plan (docs/DESIGN.md §6): None = ``VDOTAlgorithm1(gen_every)``; a
            ``dict(type=...)`` of :data:`~vdot_ext.models.step_plans.STEP_PLANS`; or a cyclic list of steps
            ``dict(role=..., objective=..., repeat=1)`` (see :mod:`vdot_ext.models.step_plans`).
        gen_every: TTUR ratio of ``VDOTAlgorithm1`` (the generator steps once per ``gen_every``; default 5);
            must stay None with another schedule.
        gan_critic_trains: what the critic's GAN step trains. 'fake_score_and_heads' (default; the public
            code: ``training/trainer/distillation_vace.py`` ``train`` sets ``fake_score.requires_grad_(True)``
            for every critic step, and ``critic_loss`` runs the fake score with gradients on odd steps) or
            'heads' (VDOT Algorithm 1 line 22: only τ; the fake score gives hidden states without gradients).
        gan_critic_shared_noise: the critic's GAN step noises the fake and the real latents with the same ε
            (default True; the public code's ``critic_loss`` reuses ``critic_noise``). The generator's GAN step
            draws them independently, as the public ``generator_loss`` does.
        generator_timesteps: the few-step schedule before shifting.
        generator_shift: shift applied to ``generator_timesteps``.
        score_shift, gan_shift, min_t, max_t: timestep sampling (docs/DESIGN.md §4, Eq. 5).
        score_t_clamp: how DMD/OTD and denoising timesteps meet [min_t, max_t]. 'before_shift' (default; the
            public stage-2 code, ``bi_dmd_gan.py``: ``randint(min_step=20, max_step=980)``, then the shift,
            then ``clamp(20, 980)``): t = clamp(shift(U[min_t, max_t)), min_t, max_t), so the smallest t is
            shift_5(20) ≈ 92.6. 'after_shift': t = clamp(shift(U[0, 1000)), min_t, max_t), smallest t = min_t
            (Self-Forcing's stage-1 ``dmd.py``). GAN timesteps always use 'after_shift' (the public code draws
            them from [0, 1000) before the shift).
        guidance_scale: teacher CFG ``v = v_u + w (v_c − v_u)``; 1 = no CFG.
        uncond: the unconditional branch of the teacher's CFG. 'negative_prompt' (default; the public code
            encodes Wan's negative prompt, ``distillation_vace.py`` ``sample_neg_prompt``): the batch must
            carry ``negative_context`` whenever guidance_scale != 1, else a ``KeyError``. 'zeros': an all-zero
            text embedding (a teacher trained with zeroed-text dropout, e.g. the tiny demo's).
        use_vace_context: feed ``vace_context`` from the data to all scores.
        seed: seeds the rollout's exit step (identical on all ranks).
        max_consecutive_nonfinite: a role whose step is skipped this many times in a
            row (non-finite loss or gradients) stops training with ``RuntimeError``.
            Consecutive counts the role's own steps: the generator's are
            ``gen_every`` iterations apart.

    Extending (docs/DESIGN.md §6, §13): a recipe with other objectives overrides
    :meth:`available_objectives` and :meth:`step_losses` (and :meth:`role_modules` for new roles); the
    schedule, the guarded step per role and the logging stay as they are.
    """

    TRAINABLE_ROLES = ('generator', 'critic')
    SCHEDULE_TRACE_LENGTH = 1000

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
                 dm_weighting: str = 'balanced',
                 balanced_ot_debias: bool = True,
                 schedule=None,
                 gen_every: Optional[int] = None,
                 gan_critic_trains: str = 'fake_score_and_heads',
                 gan_critic_shared_noise: bool = True,
                 generator_timesteps: Sequence[float] = (1000, 750, 500, 250),
                 generator_shift: float = 5.0,
                 score_shift: float = 5.0,
                 gan_shift: float = 12.0,
                 min_t: float = 20.0,
                 max_t: float = 980.0,
                 score_t_clamp: str = 'before_shift',
                 guidance_scale: float = 1.0,
                 uncond: str = 'negative_prompt',
                 use_vace_context: bool = True,
                 seed: int = 0,
                 max_consecutive_nonfinite: int = 10,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if denoising_loss is None:
            raise ValueError('VDOTDistiller.denoising_loss is required: the fake '
                             'score must track the generator (DMD/OTD need it)')
        self.dm_weighting = _choice('dm_weighting', dm_weighting, DM_WEIGHTINGS)
        self.gan_critic_trains = _choice('gan_critic_trains', gan_critic_trains, GAN_CRITIC_TRAINS)
        self.score_t_clamp = _choice('score_t_clamp', score_t_clamp, SCORE_T_CLAMPS)
        self.uncond = _choice('uncond', uncond, UNCONDS)
        self.gan_critic_shared_noise = bool(gan_critic_shared_noise)
        if not 0.0 <= min_t < max_t <= 1000.0:
            raise ValueError(f'VDOTDistiller: need 0 <= min_t < max_t <= 1000, got min_t={min_t}, max_t={max_t}')

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
        self.balanced_ot_debias = bool(balanced_ot_debias)
        if self.dm_weighting == 'balanced' and self.otd_loss is not None \
                and getattr(self.otd_loss, 'normalize', 'none') != 'none':
            raise ValueError("VDOTDistiller(dm_weighting='balanced') reads OTD's raw envelope gradient: set "
                             f"model.otd_loss.normalize='none' (got {self.otd_loss.normalize!r}); "
                             "balanced mode applies its own normalisation (docs/DESIGN.md §5); or set "
                             "model.dm_weighting='parity' for the public code's normalised OT step")

        # --- schedule (docs/DESIGN.md §6) ---------------------------------
        is_algorithm1 = schedule is None or isinstance(schedule, VDOTAlgorithm1) or (
            isinstance(schedule, dict) and schedule.get('type') in ('VDOTAlgorithm1', VDOTAlgorithm1))
        if gen_every is not None and not is_algorithm1:
            raise ValueError('VDOTDistiller: model.gen_every is the TTUR ratio of VDOTAlgorithm1; with the '
                             f'schedule {schedule!r} set gen_every=None (the schedule says when each role steps)')
        self.schedule: StepSchedule = build_schedule(schedule, gen_every)
        self.schedule.bind(self.available_objectives(), field='model.schedule')
        self.gen_every = getattr(self.schedule, 'gen_every', None)

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
        # the schedule where it stopped
        self.register_buffer('iteration', torch.zeros((), dtype=torch.long))
        # skip counters per role: buffers too, so they survive resume
        self.nonfinite_guard = NonFiniteGuard(self.TRAINABLE_ROLES, max_consecutive_nonfinite,
                                              owner='VDOTDistiller')
        # the plans of the last SCHEDULE_TRACE_LENGTH iterations (tests, debugging); bounded, so a long
        # run does not grow it without end
        self.schedule_trace: Deque[StepPlan] = collections.deque(maxlen=self.SCHEDULE_TRACE_LENGTH)
        self.updated_roles: Tuple[str, ...] = ()   # roles whose weights the last train_step changed (EMA)
        self._accumulation_checked = False

    # ------------------------------------------------------------------
    # roles, for optimizers and strategies
    # ------------------------------------------------------------------
    def role_modules(self, role: str) -> Dict[str, nn.Module]:
        """The modules of a trainable role by attribute name (to name parameters in messages)."""
        if role == 'generator':
            return dict(generator=self.generator)
        if role == 'critic':
            named = dict(fake_score=self.fake_score)
            if self.discriminator is not None:
                named['discriminator'] = self.discriminator
            return named
        raise KeyError(f'unknown role {role!r}; roles are {self.TRAINABLE_ROLES}')

    def trainable_roles(self) -> Dict[str, List[nn.Module]]:
        return {role: list(self.role_modules(role).values()) for role in self.TRAINABLE_ROLES}

    def _critic_modules(self) -> Dict[str, nn.Module]:
        return self.role_modules('critic')

    def frozen_roles(self) -> Dict[str, nn.Module]:
        return {'real_score': self.real_score}

    def role_param_groups(self, role: str) -> List[dict]:
        return [dict(name=name, params=list(module.parameters()))
                for name, module in self.role_modules(role).items()]

    def available_objectives(self) -> Dict[str, Tuple[str, ...]]:
        """``{role: objectives}`` this model can step (a schedule is checked against it)."""
        gan = self.gan_loss is not None
        dm = self.dmd_loss is not None or self.otd_loss is not None
        return {'generator': (('dm', ) if dm else ()) + (('gan', ) if gan else ()),
                'critic': ('denoise', ) + (('gan', ) if gan else ())}

    def plan(self, k: int) -> StepPlan:
        return self.schedule.plan(k)

    def _check_accumulation(self, optim_wrapper) -> None:
        """A schedule that spreads each step over ``accumulate`` batches (``VDOTAlgorithm1.accumulate``) needs
        every role it steps to accumulate exactly that many (docs/DESIGN.md §6); any other pairing would
        update a role in the middle of a step, or across two objectives."""
        want = getattr(self.schedule, 'accumulate', None)
        if want is None:
            self._accumulation_checked = True
            return
        for role in self.TRAINABLE_ROLES:
            if role not in optim_wrapper:
                continue
            wrapper = optim_wrapper[role]
            engine = getattr(wrapper, 'engine', None)   # DeepSpeed: the engine's gradient_accumulation_steps
            got = int(engine.gradient_accumulation_steps()) if engine is not None \
                else int(getattr(wrapper, '_accumulative_counts', 1))
            if got != want:
                source = (f"the {role}'s DeepSpeed engine accumulates {got} batches (gradient_accumulation_steps, "
                          f'from optim_wrapper.{role}.accumulative_counts)') if engine is not None else \
                    f'optim_wrapper.{role}.accumulative_counts is {got}'
                raise ValueError(f'{source} but model.schedule.accumulate is {want}: set both to the same number '
                                 'of batches per step of Algorithm 1')
        self._accumulation_checked = True

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
                    negative_context=self._negative_context(data),
                    vace_context=None,
                    shape=tuple(data['latents'].shape),
                    real_latents=data['latents'])
        if self.use_vace_context:
            if data.get('vace_context') is None:
                raise KeyError('VDOTDistiller(use_vace_context=True): the data batch '
                               "has no 'vace_context'")
            cond['vace_context'] = data['vace_context']
        return cond

    def _negative_context(self, data: dict) -> Optional[torch.Tensor]:
        """The CFG's unconditional text embedding (None without CFG)."""
        if self.guidance_scale == 1.0:
            return None
        context = data['context']
        if self.uncond == 'zeros':
            return torch.zeros_like(context)
        negative = data.get('negative_context')
        if negative is None:
            raise KeyError(
                "VDOTDistiller(uncond='negative_prompt', guidance_scale="
                f"{self.guidance_scale}): the data batch has no 'negative_context' (keys: {sorted(data)}). "
                "Encode Wan's negative prompt into the data (precompute_vcu --negative-prompt, or the "
                "dataset's negative_prompt), or set model.uncond='zeros' for a teacher whose "
                'unconditional branch is an all-zero text embedding')
        if negative.shape[0] != context.shape[0] or negative.shape[-1] != context.shape[-1] \
                or negative.ndim != context.ndim:
            raise ValueError(f"VDOTDistiller: the batch's negative_context {tuple(negative.shape)} does not "
                             f'match its context {tuple(context.shape)} (batch and embedding dims)')
        return negative

    def _score_x0(self, score, x_t, t, cond, **kw):
        return score.predict_x0(x_t, t, cond['context'], cond['vace_context'], **kw)

    def teacher_x0(self, x_t, t, cond):
        """Teacher x0 with classifier-free guidance on the text (docs/DESIGN.md §4, Eq. 8)."""
        v = self.real_score(x_t, t, cond['context'], cond['vace_context'])
        if self.guidance_scale != 1.0:
            v_u = self.real_score(x_t, t, cond['negative_context'], cond['vace_context'])
            v = v_u.float() + self.guidance_scale * (v.float() - v_u.float())
        return x0_from_velocity(x_t.float(), v.float(), t)

    def exit_step(self, k: int) -> int:
        """The rollout's exit step at iteration k: a function of (seed, k) only,
        so every rank draws the same one without communication. All steps of
        iteration k share it."""
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

    def sample_t(self, batch: int, kind: str, device=None) -> torch.Tensor:
        """Timesteps for ``kind`` 'score' (DMD, OTD, denoising) or 'gan' (docs/DESIGN.md §4, Eq. 5)."""
        if kind == 'gan':
            t = sample_timesteps(batch, self.gan_shift, self.min_t, self.max_t)
        elif kind == 'score' and self.score_t_clamp == 'after_shift':
            t = sample_timesteps(batch, self.score_shift, self.min_t, self.max_t)
        elif kind == 'score':
            # the public stage-2 code: the range is applied before the shift (smallest t = shift(min_t))
            u = self.min_t + (self.max_t - self.min_t) * torch.rand(batch)
            t = shift_timesteps(u, self.score_shift).clamp(self.min_t, self.max_t)
        else:
            raise ValueError(f"sample_t: kind must be 'score' or 'gan', got {kind!r}")
        return t.to(device) if device is not None else t

    def _disc_logits(self, x_t, t, cond):
        _, feats = self.fake_score(x_t, t, cond['context'], cond['vace_context'],
                                   return_hidden_at=self.discriminator.taps)
        return self.discriminator(feats.hidden, feats.time_emb)

    # ------------------------------------------------------------------
    # objectives
    # ------------------------------------------------------------------
    def generator_losses(self, cond: dict, objective: str, exit_step: int):
        """Generator losses for ``objective`` ('dm' or 'gan') and their statistics.

        Each term is evaluated at a detached copy x of the generator sample x̂0; its gradient g on x is
        taken there (logged: ``gen_x_grad_norm_<term>``, shares, cosine) and reaches the generator through
        ``value + ⟨x̂0 − sg(x̂0), sg(g)⟩``, whose value is the term's and whose gradient is J_θᵀ g.
        """
        x0 = self.rollout(cond, exit_step, grad=True)
        x = x0.detach().float().requires_grad_(True)
        batch, device = x.shape[0], x.device
        stats: Dict[str, float] = {}
        if objective == 'dm':
            # score both networks on the same noisy sample of the detached x0
            t = self.sample_t(batch, 'score', device)
            x_t = add_noise(x.detach(), torch.randn_like(x), t)
            with torch.no_grad():
                pred_fake = self._score_x0(self.fake_score, x_t, t, cond).float()
                pred_real = self.teacher_x0(x_t, t, cond)
            values, grads, stats = distribution_matching_gradients(
                x, pred_fake, pred_real, t, self.otd_loss, self.dmd_loss, self.dm_weights,
                self.dm_weighting, self.balanced_ot_debias)
            # OTD's value is a constant by construction (parity): not a loss curve
            names = dict(otd='surrogate_gen_otd', dmd='loss_gen_dmd')
        elif objective == 'gan':
            # real and fake noised at the same GAN timestep (eq. 11), independent noise (public generator_loss)
            t = self.sample_t(batch, 'gan', device)
            x_t_fake = add_noise(x, torch.randn_like(x), t)
            x_t_real = add_noise(cond['real_latents'].float(), torch.randn_like(x), t)
            logits_fake = self._disc_logits(x_t_fake, t, cond)
            with torch.no_grad():
                logits_real = self._disc_logits(x_t_real, t, cond)
            value = self.gan_loss(logits_fake, logits_real, 'generator')
            (grad, ) = torch.autograd.grad(value, x)
            _nonfinite('GAN', grad)
            values, grads = dict(gan=value), dict(gan=grad)
            names = dict(gan='loss_gen_gan')
        else:
            raise ValueError(f'unknown generator objective {objective!r}')
        stats.update(gradient_stats(grads))
        delta = x0.float() - x0.detach().float()          # 0 in value, identity in gradient
        losses = {names[name]: values[name].detach() + (delta * grads[name]).sum() for name in values}
        return losses, stats

    def critic_losses(self, cond: dict, objective: str, exit_step: int) -> dict:
        """Fake-score denoising loss or discriminator GAN loss."""
        with torch.no_grad():
            x0 = self.rollout(cond, exit_step, grad=False).float()
        batch, device = x0.shape[0], x0.device
        if objective == 'denoise':
            t = self.sample_t(batch, 'score', device)
            noise = torch.randn_like(x0)
            v = self.fake_score(add_noise(x0, noise, t), t, cond['context'],
                                cond['vace_context'])
            return {'loss_critic_denoise': self.denoising_loss(v, x0, noise, t)}
        if objective == 'gan':
            t = self.sample_t(batch, 'gan', device)
            noise_fake = torch.randn_like(x0)
            noise_real = noise_fake if self.gan_critic_shared_noise else torch.randn_like(x0)
            x_t_fake = add_noise(x0, noise_fake, t)
            x_t_real = add_noise(cond['real_latents'].float(), noise_real, t)
            # 'heads' (Algorithm 1, line 22): the fake score supplies hidden states without gradients;
            # 'fake_score_and_heads' (public code): the GAN loss trains the fake score too
            with torch.set_grad_enabled(self.gan_critic_trains == 'fake_score_and_heads'):
                feats = [self.fake_score(x, t, cond['context'], cond['vace_context'],
                                         return_hidden_at=self.discriminator.taps)[1]
                         for x in (x_t_fake, x_t_real)]
            logits_fake, logits_real = (self.discriminator(f.hidden, f.time_emb)
                                        for f in feats)
            return {'loss_critic_gan': self.gan_loss(logits_fake, logits_real,
                                                     'discriminator')}
        raise ValueError(f'unknown critic objective {objective!r}')

    def step_losses(self, role: str, objective: str, cond: dict,
                    exit_step: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """``(losses, stats)`` of one step of ``role`` on ``objective`` (given to the guarded step)."""
        if role == 'generator':
            return self.generator_losses(cond, objective, exit_step)
        if role == 'critic':
            return self.critic_losses(cond, objective, exit_step), {}
        raise KeyError(f'unknown role {role!r}; roles are {self.TRAINABLE_ROLES}')

    # ------------------------------------------------------------------
    # mmengine interface
    # ------------------------------------------------------------------
    def _set_trainable(self, role: Optional[str], objective: Optional[str] = None):
        """Only ``role``'s modules require grad (None freezes all); the critic's GAN step in
        ``gan_critic_trains='heads'`` mode keeps the fake score frozen."""
        from .lora import set_requires_grad  # keeps LoRA base weights frozen
        for name in self.TRAINABLE_ROLES:
            for module in self.role_modules(name).values():
                set_requires_grad(module, name == role)
        if role == 'critic' and objective == 'gan' and self.gan_critic_trains == 'heads':
            set_requires_grad(self.fake_score, False)

    def run_step(self, step: Step, optim_wrapper, cond: dict, data: dict, k: int,
                 exit_step: int) -> GuardedStep:
        """One guarded optimizer step of ``step.role`` on ``step.objective`` (docs/DESIGN.md §11)."""
        self._set_trainable(step.role, step.objective)
        modules = self.role_modules(step.role)
        compute: Callable = lambda: self.step_losses(step.role, step.objective, cond, exit_step)  # noqa: E731
        return self.nonfinite_guard.step(
            step.role, optim_wrapper[step.role], next(iter(modules.values())), compute,
            data=data, iteration=k, named_modules=modules)

    def train_step(self, data, optim_wrapper) -> Dict[str, torch.Tensor]:
        """One iteration: the steps of the schedule's plan for iteration k, in order.

        ``optim_wrapper`` is an ``OptimWrapperDict`` with ``generator`` and
        ``critic`` entries. Each step is guarded (docs/DESIGN.md §11): a non-finite
        loss or gradient skips that role's update. Returns every finite loss term
        and statistic computed (a role stepping twice in one iteration logs its last
        step), and ``nonfinite_skips_<role>`` (total skips).

        The ``iteration`` counter advances on every call, skipped steps included:
        the schedule and the exit step are functions of the number of batches
        consumed, so a run with skips keeps the same plan as one without, and a
        resumed run continues it exactly.
        """
        if not self._accumulation_checked:
            self._check_accumulation(optim_wrapper)
        data = self.data_preprocessor(data, True)
        cond = self._conditions(data)
        k = int(self.iteration.item())
        plan = self.plan(k)
        exit_step = self.exit_step(k)
        log: Dict[str, torch.Tensor] = {}
        updated = []
        try:
            for step in plan.steps:
                done = self.run_step(step, optim_wrapper, cond, data, k, exit_step)
                if done.updated and step.role not in updated:
                    updated.append(step.role)
                log.update(done.losses)
                log.update({k_: torch.tensor(float(v)) for k_, v in done.stats.items()})
                if step.role == 'generator':
                    log['gen_exit_step'] = torch.tensor(float(exit_step))
        finally:
            self._set_trainable(None)

        self.schedule_trace.append(plan)
        self.updated_roles = tuple(updated)
        self.iteration += 1
        log.update(self.nonfinite_guard.log_vars())
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
