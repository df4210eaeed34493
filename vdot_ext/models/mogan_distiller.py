"""MoGAN as a recipe of :class:`~vdot_ext.models.vdot_distiller.VDOTDistiller` (docs/DESIGN.md §13).

MoGAN ("Improving Motion Quality in Video Diffusion via Few-Step Motion Adversarial Post-Training") post-trains a
few-step DMD generator G_θ with an optical-flow GAN, keeping it near the teacher with the DMD regulariser. It
reuses the distiller's roles (generator, teacher, fake score), its losses (DMD, optionally OTD: the swap of
MoGAN+OTD is a config change), its schedule mechanism and its guarded step, and adds one objective and one role:

* ``generator`` / ``'motion_gan'`` (MoGAN eq. 5): x̂0 = G_θ(x_{t_i}, t_i) (the rollout's exit step) → a random
  window of L latent chunks decoded by the frozen Wan VAE *with gradients* (truncated BPTT, checkpointing:
  :mod:`.vae_decoding`) → frozen flow estimator F (:mod:`.optical_flow`) → D_φ → ``λ1·g(−D(o_gen))``;
* ``motion_discriminator`` / ``'motion_gan'`` (MoGAN eqs. 4, 6, 7): D_φ on the flows of a generated clip and of
  a real clip cut to the same window, ``λ2·[g(−D(o_real)) + g(D(o_gen))] + λ_R1·L_R1 + λ_R2·L_R2``
  (:class:`~vdot_ext.losses.logistic_gan_loss.LogisticGANLoss`; any GAN loss with the same call works, e.g.
  ``RelativisticGANLoss``).

Real clips are the batch's real latents decoded by the same VAE in the same window of chunks, so real and
generated flows come from the same decoder (docs/DESIGN.md §12).

The generator term follows the distiller's pattern: evaluated at a detached copy x of x̂0, its gradient
g = ∂L/∂x (logged as ``gen_x_grad_norm_motion_gan``) reaches θ through ``⟨x̂0, sg(g)⟩``.

The order of the updates is data (:mod:`.mogan_schedules`): by default MoGAN's Appendix-B order behind a warm-up
gate of ``motion_gan_start_iter`` iterations. Table 2's ablations are config changes: ``r1_weight = r2_weight =
0`` (no R1/R2), ``motion_input='latents'`` with a :class:`LatentVideoDiscriminator` (a video-space GAN on the
latents, no decoder and no flow), ``dmd_loss=None`` and a schedule without the ``'dm'`` step (no DMD).
"""
import inspect
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS
from vdot_ext.utils import NonFiniteError

from .mogan_schedules import MOGAN_ORDER, MOTION_OBJECTIVE, WarmupGatedPlan
from .motion_discriminator import MotionDiscriminator
from .optical_flow import OpticalFlowEstimator, build_flow_estimator
from .vae_decoding import WindowedVAEDecoding, sample_window
from .vdot_distiller import VDOTDistiller, gradient_stats
from .weights import load_weights

__all__ = ['MoGANDistiller', 'LatentVideoDiscriminator', 'CheckpointInit', 'MOTION_INPUTS']

#: what D_φ reads: optical flow of the decoded window (MoGAN) or the window's latents (Table 2, "w/o optical flow")
MOTION_INPUTS = ('flow', 'latents')


def _merged_signature(cls, base, skip: Sequence[str] = ()) -> inspect.Signature:
    """``cls.__init__``'s own keywords followed by ``base.__init__``'s (without ``**kwargs``), so that the
    config checks (``vdot_ext.engine.config_checks``) see every keyword a subclass forwarding ``**kwargs``
    accepts."""
    own = [p for p in inspect.signature(cls.__init__).parameters.values()
           if p.name != 'self' and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    names = {p.name for p in own} | set(skip)
    inherited = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(base.__init__).parameters.values()
                 if p.name != 'self' and p.name not in names and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    positional = [p for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in own if p.kind == p.KEYWORD_ONLY]
    return inspect.Signature(positional + keyword + inherited)


# ----------------------------------------------------------------------------------------------- initialiser
@MODELS.register_module()
class CheckpointInit:
    """Initialiser: load a role's weights from a training checkpoint, strictly, safely and finite-checked.

    ``checkpoint`` is a file (a staged run's ``final_model.pth``, the plain Runner's ``iter_N.pth``,
    safetensors: :func:`~vdot_ext.models.weights.load_weights`) or a ``RoleDeepSpeedStrategy`` checkpoint
    folder, whose ``deepspeed_role`` engine files are consolidated (default: the role owning ``prefix``:
    ``generator.`` → ``generator``, ``fake_score.`` → ``critic``). Keys under ``prefix`` (stripped) must match
    the module exactly. ``init(module)`` returns a report dict.
    """

    _ROLE_OF_PREFIX = {'generator.': 'generator', 'fake_score.': 'critic', 'discriminator.': 'critic'}

    def __init__(self, checkpoint: str, prefix: str = '', ignore: Sequence[str] = (),
                 deepspeed_role: Optional[str] = None):
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f'CheckpointInit.checkpoint must be a file or folder path, got {checkpoint!r}')
        self.checkpoint, self.prefix, self.ignore = checkpoint, prefix, tuple(ignore)
        self.deepspeed_role = deepspeed_role

    def __call__(self, module: nn.Module) -> dict:
        from .checkpoint_io import check_state_dict
        from .vace_acc_wan_init import is_deepspeed_checkpoint, read_deepspeed_role_state_dict
        field = f'CheckpointInit(checkpoint={self.checkpoint!r}, prefix={self.prefix!r})'
        if not is_deepspeed_checkpoint(self.checkpoint):
            load_weights(module, self.checkpoint, prefix=self.prefix, ignore=self.ignore, field=field)
            return dict(checkpoint=self.checkpoint, prefix=self.prefix, tensors=len(module.state_dict()))
        role = self.deepspeed_role or self._ROLE_OF_PREFIX.get(self.prefix)
        if role is None:
            raise ValueError(f'{field}: {self.checkpoint} is a DeepSpeed checkpoint folder; set deepspeed_role '
                             f'(the role engine holding the keys under {self.prefix!r})')
        state = read_deepspeed_role_state_dict(self.checkpoint, role, field=field)
        picked = {k[len(self.prefix):]: v for k, v in state.items() if k.startswith(self.prefix)}
        picked = {k: v for k, v in picked.items() if not k.startswith(self.ignore)}
        check_state_dict(module, picked, self.checkpoint, f'{type(module).__name__} ({field}, role {role!r})')
        module.load_state_dict(picked, strict=True)
        return dict(checkpoint=self.checkpoint, prefix=self.prefix, tensors=len(picked), deepspeed_role=role)


# ------------------------------------------------------------------------------- video-space discriminator
@MODELS.register_module()
class LatentVideoDiscriminator(MotionDiscriminator):
    """MoGAN Table 2, "w/o optical flow": the same DiT discriminator on the window's *latents*.

    MoGAN §6.4: "applies the adversarial objective directly in the video latent space, removing the flow
    estimator and downstream encoder/decoder". The backbone, t* = 0, the fixed prompt and the heads are
    :class:`MotionDiscriminator`'s; the input is latents [B, C, F, h, w] patch-embedded like the teacher's DiT
    (``patch_size`` (1, 2, 2), initialised from the teacher's ``patch_embedding`` by :meth:`init_from_score`).

    Args:
        in_channels: latent channels (Wan: 16).
        patch_size: (t, h, w) of the patch embedding (the teacher's: (1, 2, 2)).
        other arguments: :class:`MotionDiscriminator`'s.
    """

    def __init__(self, prompt_embedding, preset: Optional[str] = None, *, in_channels: int = 16,
                 patch_size: Sequence[int] = (1, 2, 2), **kwargs):
        super().__init__(prompt_embedding, preset, patch_size=patch_size, **kwargs)
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f'LatentVideoDiscriminator.in_channels must be a positive int, got {in_channels!r}')
        self.in_channels = in_channels
        self.patch_embedding = nn.Conv3d(in_channels, self.arch['dim'], kernel_size=self.patch_size,
                                         stride=self.patch_size)

    @torch.no_grad()
    def init_from_score(self, score) -> 'LatentVideoDiscriminator':
        super().init_from_score(score)
        theirs = score.dit.patch_embedding
        if tuple(theirs.weight.shape) != tuple(self.patch_embedding.weight.shape):
            raise ValueError(f'LatentVideoDiscriminator.init_from_score: the score network\'s patch embedding '
                             f'{tuple(theirs.weight.shape)} differs from this one '
                             f'{tuple(self.patch_embedding.weight.shape)} (in_channels, patch_size)')
        self.patch_embedding.load_state_dict(theirs.state_dict())
        return self

    def embed(self, latents: torch.Tensor):
        pt, ph, pw = self.patch_size
        f, h, w = latents.shape[2:]
        if f % pt or h % ph or w % pw:
            raise ValueError(f'LatentVideoDiscriminator: latent size F×h×w = {f}×{h}×{w} must be divisible by '
                             f'the patch size {self.patch_size}')
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).contiguous(), grid

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits [B] (float32) for latents [B, in_channels, F, h, w]."""
        if latents.ndim != 5 or latents.shape[1] != self.in_channels:
            raise ValueError(f'LatentVideoDiscriminator.forward: latents must be [B, {self.in_channels}, F, h, w], '
                             f'got {tuple(latents.shape)}')
        # the same backbone and heads as MotionDiscriminator (t* = 0, fixed prompt, taps, heads)
        return self.logits_from_tokens(*self.embed(latents))


LatentVideoDiscriminator.__signature__ = _merged_signature(LatentVideoDiscriminator, MotionDiscriminator)


# ------------------------------------------------------------------------------------------------ distiller
@MODELS.register_module()
class MoGANDistiller(VDOTDistiller):
    """MoGAN post-training: DMD regulariser (+ OTD by config) and an optical-flow GAN (docs/DESIGN.md §13).

    Roles: VDOTDistiller's (``generator``, ``critic`` = fake score; the teacher frozen) and
    ``motion_discriminator`` D_φ (its own optimizer entry ``optim_wrapper.motion_discriminator``). The VAE and
    the flow estimator are frozen, in float32, and not optimised.

    Args:
        motion_discriminator: a :class:`MotionDiscriminator` config (or :class:`LatentVideoDiscriminator` with
            ``motion_input='latents'``). Without ``preset``, its architecture fields are the teacher's.
        motion_gan_loss: the GAN loss of both motion steps (default MoGAN's ``LogisticGANLoss`` with λ1 = λ2 =
            0.5, λ_R1 = λ_R2 = 0.3, σ = 0.01). A loss with ``regularizer(...)`` adds its terms to the
            discriminator step.
        vae_checkpoint: the Wan VAE (``Wan2.1_VAE.pth`` or the demo's ``TinyWanVAE`` file) that decodes x̂0;
            required with ``motion_input='flow'``.
        flow_estimator: a frozen :class:`OpticalFlowEstimator` config (``RAFTFlow`` with a local weight file,
            as the paper; or the weight-free ``LucasKanadeFlow``).
        decoding: ``WindowedVAEDecoding`` config: L = ``window_chunks`` latent chunks decoded with gradients
            (MoGAN 1.3B: 12), gradient checkpointing, clamping. The window also cuts the latents of
            ``motion_input='latents'``.
        motion_input: ``'flow'`` (MoGAN) or ``'latents'`` (the video-space ablation).
        motion_gan_start_iter: warm-up gate (MoGAN §4.2): iterations before the first motion-GAN step;
            the schedule is wrapped in :class:`~vdot_ext.models.mogan_schedules.WarmupGatedPlan`.
        init_motion_discriminator_from_teacher: copy the teacher's first ``num_blocks`` DiT blocks and its
            time/text embeddings into D_φ (MoGAN §5.1: "the first 16 layers of the pretrained Wan2.1-T2V-1.3B").
        fake_score_init: an initialiser for the fake score (e.g. ``CheckpointInit`` of the DMD student's
            fake score), applied after ``init_from_teacher``; not with ``fake_score_lora``.
        schedule: the step plan after the warm-up (default MoGAN's Appendix-B order,
            :data:`~vdot_ext.models.mogan_schedules.MOGAN_ORDER`).
        other arguments: :class:`VDOTDistiller`'s (teacher, losses, timesteps, CFG, LoRA, ...).
    """

    TRAINABLE_ROLES = ('generator', 'critic', 'motion_discriminator')

    def __init__(self,
                 motion_discriminator: dict,
                 motion_gan_loss: dict = dict(type='LogisticGANLoss'),
                 vae_checkpoint: Optional[str] = None,
                 flow_estimator: Optional[dict] = dict(type='LucasKanadeFlow'),
                 decoding: dict = dict(type='WindowedVAEDecoding', window_chunks=12),
                 motion_input: str = 'flow',
                 motion_gan_start_iter: int = 0,
                 init_motion_discriminator_from_teacher: bool = True,
                 fake_score_init: Optional[dict] = None,
                 schedule=MOGAN_ORDER,
                 **kwargs):
        if motion_input not in MOTION_INPUTS:
            raise ValueError(f'MoGANDistiller.motion_input (model.motion_input) must be one of {MOTION_INPUTS}, '
                             f'got {motion_input!r}')
        if not isinstance(motion_discriminator, dict) or motion_gan_loss is None:
            raise ValueError('MoGANDistiller: model.motion_discriminator (a dict(type=...)) and '
                             'model.motion_gan_loss are required; a recipe without the motion GAN is a '
                             'VDOTDistiller')
        if fake_score_init is not None and kwargs.get('fake_score_lora') is not None:
            raise ValueError('MoGANDistiller: model.fake_score_init loads full fake-score weights, which LoRA '
                             '(model.fake_score_lora) has already wrapped; initialise the base instead')
        if kwargs.get('gen_every') is not None:
            raise ValueError('MoGANDistiller: model.gen_every is the TTUR ratio of VDOTAlgorithm1; MoGAN\'s '
                             'order is model.schedule (set gen_every=None)')
        gated = schedule if isinstance(schedule, WarmupGatedPlan) else WarmupGatedPlan(schedule,
                                                                                       motion_gan_start_iter)
        if isinstance(schedule, WarmupGatedPlan) and motion_gan_start_iter:
            raise ValueError('MoGANDistiller: model.schedule is already a WarmupGatedPlan; set its start_iter '
                             'there and leave model.motion_gan_start_iter at 0')
        super().__init__(schedule=gated, **kwargs)
        self.motion_gan_start_iter = gated.start_iter
        self.motion_input = motion_input

        if fake_score_init is not None:
            self.fake_score_init_report = MODELS.build(fake_score_init)(self.fake_score)

        # --- D_φ (trainable role) ------------------------------------------------------------------
        disc_cfg = dict(motion_discriminator)
        if disc_cfg.get('preset') is None:
            for key in ('dim', 'ffn_dim', 'num_heads', 'text_dim', 'freq_dim', 'eps'):
                disc_cfg.setdefault(key, self.real_score.arch[key])
        self.motion_discriminator = MODELS.build(disc_cfg)
        expected = LatentVideoDiscriminator if motion_input == 'latents' else MotionDiscriminator
        if not isinstance(self.motion_discriminator, expected) or (
                motion_input == 'flow' and isinstance(self.motion_discriminator, LatentVideoDiscriminator)):
            raise TypeError(f"MoGANDistiller(motion_input={motion_input!r}): model.motion_discriminator must "
                            f'build a {expected.__name__}, got {type(self.motion_discriminator).__name__}')
        if init_motion_discriminator_from_teacher:
            self.motion_discriminator.init_from_score(self.real_score)
        self.motion_gan_loss = MODELS.build(motion_gan_loss)

        # --- frozen pixel path: VAE decoder and flow estimator -------------------------------------
        self.decoding = MODELS.build(decoding)
        if not isinstance(self.decoding, WindowedVAEDecoding):
            raise TypeError(f'MoGANDistiller.decoding must build a WindowedVAEDecoding, got '
                            f'{type(self.decoding).__name__}')
        self.vae = None
        self.flow_estimator = None
        if motion_input == 'flow':
            if not vae_checkpoint:
                raise ValueError("MoGANDistiller(motion_input='flow'): model.vae_checkpoint is required (the Wan "
                                 'VAE that decodes x̂0 for the flow estimator)')
            if flow_estimator is None:
                raise ValueError("MoGANDistiller(motion_input='flow'): model.flow_estimator is required, e.g. "
                                 "dict(type='RAFTFlow', weights_path=...) or dict(type='LucasKanadeFlow')")
            from vdot_ext.patches.vcu_codecs import load_wan_vae
            self.vae = load_wan_vae(vae_checkpoint, field='model.vae_checkpoint').float().requires_grad_(False)
            self.flow_estimator = build_flow_estimator(dict(flow_estimator))
            if not isinstance(self.flow_estimator, OpticalFlowEstimator):
                raise TypeError('MoGANDistiller.flow_estimator must build an OpticalFlowEstimator')
            self.flow_estimator.requires_grad_(False)
        self.vae_checkpoint = vae_checkpoint

    # ------------------------------------------------------------------ roles and objectives
    def role_modules(self, role: str) -> Dict[str, nn.Module]:
        if role == 'motion_discriminator':
            return dict(motion_discriminator=self.motion_discriminator)
        return super().role_modules(role)

    def available_objectives(self) -> Dict[str, Tuple[str, ...]]:
        """VDOTDistiller's objectives plus ``'motion_gan'`` for the generator and the motion discriminator."""
        available = dict(super().available_objectives())
        available['generator'] = tuple(available['generator']) + (MOTION_OBJECTIVE, )
        available['motion_discriminator'] = (MOTION_OBJECTIVE, )
        return available

    def step_losses(self, role: str, objective: str, cond: dict, exit_step: int):
        if objective == MOTION_OBJECTIVE and role == 'generator':
            return self.motion_generator_losses(cond, exit_step)
        if objective == MOTION_OBJECTIVE and role == 'motion_discriminator':
            return self.motion_discriminator_losses(cond, exit_step)
        if role == 'motion_discriminator':
            raise ValueError(f"unknown motion_discriminator objective {objective!r}; it has {MOTION_OBJECTIVE!r}")
        return super().step_losses(role, objective, cond, exit_step)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen codec
        return self

    # ------------------------------------------------------------------ the motion path
    def _check_video_latents(self, cond: dict) -> None:
        num_ref = cond.get('num_ref')
        if num_ref is not None and bool(torch.as_tensor(num_ref).ne(0).any()):
            raise ValueError('MoGANDistiller: the batch has reference frames (num_ref > 0) prepended to its '
                             'latents; the motion GAN decodes latents as one video, so use text-to-video data '
                             '(task=t2v)')

    def motion_window(self, num_chunks: int) -> Tuple[int, int]:
        """A random contiguous window of ``decoding.window_chunks`` latent chunks (torch's global RNG, which
        the runner seeds and a resumed run restores)."""
        return sample_window(num_chunks, self.decoding.window_chunks)

    def motion_features(self, latents: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
        """What D_φ reads for latents [B, 16, K, h, w] in the window [start, stop) of chunks: the flows
        [B, T−1, 2, H, W] of the decoded frames (differentiable when grad is enabled), or the latents."""
        start, stop = window
        if self.motion_input == 'latents':
            return latents[:, :, start:stop].float()
        decoded = self.decoding(self.vae, latents, start=start)
        video = decoded.video.transpose(1, 2).float()           # [B, 3, T, H, W] → [B, T, 3, H, W]
        return self.flow_estimator(video)

    def _feature_stats(self, name: str, features: torch.Tensor) -> Dict[str, float]:
        if self.motion_input == 'flow':        # mean end-point magnitude (pixels)
            return {f'motion_flow_{name}': float(torch.linalg.vector_norm(features.detach(), dim=2).mean())}
        return {}

    def motion_generator_losses(self, cond: dict, exit_step: int):
        """MoGAN eq. 5 for the generator: ``λ1·g(−D(F(decode(x̂0))))``, through the surrogate ⟨x̂0, sg(g)⟩."""
        self._check_video_latents(cond)
        x0 = self.rollout(cond, exit_step, grad=True)
        x = x0.detach().float().requires_grad_(True)
        window = self.motion_window(x.shape[2])
        features = self.motion_features(x, window)
        logits_fake = self.motion_discriminator(features)
        logits_real = None
        if getattr(self.motion_gan_loss, 'generator_uses_real', True):   # e.g. RelativisticGANLoss
            with torch.no_grad():
                logits_real = self.motion_discriminator(
                    self.motion_features(cond['real_latents'].float(), window))
        value = self.motion_gan_loss(logits_fake, logits_real, 'generator')
        (grad, ) = torch.autograd.grad(value, x)
        if not bool(torch.isfinite(grad).all()):     # a skipped step, not a NaN update (docs/DESIGN.md §11)
            rows = (~torch.isfinite(grad)).reshape(grad.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise NonFiniteError(f'MoGANDistiller: the motion-GAN gradient on the generator sample is not finite '
                                 f'in batch rows {rows}')
        stats = gradient_stats(dict(motion_gan=grad))
        stats.update(self._feature_stats('fake', features))
        stats.update(motion_window_start=float(window[0]), motion_d_fake=float(logits_fake.detach().mean()))
        delta = x0.float() - x0.detach().float()          # 0 in value, identity in gradient
        return {'loss_gen_motion_gan': value.detach() + (delta * grad).sum()}, stats

    def motion_discriminator_losses(self, cond: dict, exit_step: int):
        """MoGAN eqs. 4, 6, 7: D_φ on a generated and a real clip in the same window, plus R1/R2."""
        self._check_video_latents(cond)
        with torch.no_grad():
            x0 = self.rollout(cond, exit_step, grad=False).float()
            window = self.motion_window(x0.shape[2])
            features_fake = self.motion_features(x0, window)
            features_real = self.motion_features(cond['real_latents'].float(), window)
        logits_fake = self.motion_discriminator(features_fake)
        logits_real = self.motion_discriminator(features_real)
        losses = {'loss_motion_disc': self.motion_gan_loss(logits_fake, logits_real, 'discriminator')}
        regularizer = getattr(self.motion_gan_loss, 'regularizer', None)
        if callable(regularizer):
            terms = regularizer(self.motion_discriminator, inputs_real=features_real, inputs_fake=features_fake,
                                logits_real=logits_real, logits_fake=logits_fake)
            losses.update({f'loss_motion_{name[len("loss_"):]}': value for name, value in terms.items()})
        stats = dict(motion_window_start=float(window[0]), motion_d_real=float(logits_real.detach().mean()),
                     motion_d_fake=float(logits_fake.detach().mean()),
                     motion_d_accuracy=float(0.5 * ((logits_real > 0).float().mean()
                                                    + (logits_fake < 0).float().mean())))
        stats.update(self._feature_stats('fake', features_fake))
        stats.update(self._feature_stats('real', features_real))
        return losses, stats

    def _conditions(self, data: dict) -> dict:
        cond = super()._conditions(data)
        cond['num_ref'] = data.get('num_ref')
        return cond


MoGANDistiller.__signature__ = _merged_signature(MoGANDistiller, VDOTDistiller, skip=('schedule', ))
