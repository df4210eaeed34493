"""Flow-matching pretraining of a score network (the demo's teacher)."""
from typing import Dict, Optional

import torch
from mmengine.model import BaseModel

from vdot_ext.registry import MODELS

from .flow_matching import add_noise, sample_timesteps, velocity_target
from .guarded_step import NonFiniteGuard


@MODELS.register_module()
class FlowMatchingPretrainer(BaseModel):
    """Trains ``score`` by rectified flow: ``mean((v_θ(x_t, t) − (ε − x0))²)``.

    A random teacher teaches nothing; the tiny demo therefore first trains its
    VACE teacher with this model on the synthetic data. ``vace_drop_prob``
    trains the Wan DiT alone on a share of the batches (no ``vace_context``),
    so that the teacher's DiT is also a text-to-video model, as Wan2.1-T2V is
    for VACE-Wan2.1. ``text_drop_prob`` zeroes the text context so that the
    teacher supports classifier-free guidance with a zero negative context.

    Args:
        score: ``WanVACEScore`` config.
        timestep_shift: shift of the training timestep distribution (§4).
        text_drop_prob: probability of training on the zero (null) context.
        vace_drop_prob: probability of dropping ``vace_context`` for a batch.
        max_consecutive_nonfinite: after this many skipped steps in a row
            (non-finite loss or gradients; docs/DESIGN.md §11) training stops with
            ``RuntimeError``.
        pretrained: start ``score`` from the demo's shipped teacher:
            ``dict(assets='shipped' or a folder, sha256=None or the pinned digest)``.
            ``tiny_vace_teacher.safetensors`` there is checked against the digest
            (default: the folder's ``manifest.json``) and read with
            ``load_weights`` (strict keys and shapes, finite values) — the loader
            of every other score checkpoint. With ``max_iters=0`` the teacher
            stage then writes these weights as its ``final_model.pth``.
    """

    TRAINABLE_ROLES = ('score', )

    def __init__(self,
                 score: dict,
                 timestep_shift: float = 3.0,
                 text_drop_prob: float = 0.1,
                 vace_drop_prob: float = 0.3,
                 max_consecutive_nonfinite: int = 10,
                 pretrained: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.score = MODELS.build(score)
        if pretrained is not None:
            self._load_pretrained(dict(pretrained))
        self.timestep_shift = timestep_shift
        self.text_drop_prob = text_drop_prob
        self.vace_drop_prob = vace_drop_prob
        # skip counter (a buffer: it survives resume)
        self.nonfinite_guard = NonFiniteGuard(self.TRAINABLE_ROLES, max_consecutive_nonfinite,
                                              owner='FlowMatchingPretrainer')

    def _load_pretrained(self, pretrained: dict) -> None:
        from .tiny_codecs import verify_demo_asset
        from .weights import load_weights
        unknown = set(pretrained) - {'assets', 'sha256'}
        if unknown or 'assets' not in pretrained:
            raise ValueError(f'FlowMatchingPretrainer.pretrained: expected dict(assets=..., sha256=...), '
                             f'got keys {sorted(pretrained)}')
        path = verify_demo_asset(pretrained['assets'], 'teacher', pretrained.get('sha256'))
        load_weights(self.score, path, field='FlowMatchingPretrainer.pretrained')
        self.pretrained_path = path

    def trainable_roles(self):
        return {'score': [self.score]}

    def role_param_groups(self, role: str):
        if role != 'score':
            raise KeyError(f"unknown role {role!r}; FlowMatchingPretrainer trains 'score'")
        return [dict(name='score', params=list(self.score.parameters()))]

    def loss(self, data: dict) -> Dict[str, torch.Tensor]:
        x0 = data['latents'].float()
        context = data['context']
        batch = x0.shape[0]
        keep_text = (torch.rand(batch, device=x0.device) >= self.text_drop_prob)
        context = context * keep_text.view(-1, 1, 1).to(context.dtype)
        vace_context = data.get('vace_context')
        if vace_context is not None and float(torch.rand(())) < self.vace_drop_prob:
            vace_context = None
        if vace_context is None and data.get('num_ref') is not None \
                and int(torch.as_tensor(data['num_ref']).max()) > 0:
            # reference frames only make sense with their VACE condition
            vace_context = data['vace_context']
        t = sample_timesteps(batch, self.timestep_shift, 0.0, 1000.0).to(x0.device)
        noise = torch.randn_like(x0)
        v = self.score(add_noise(x0, noise, t), t, context, vace_context)
        return {'loss_flow': (v.float() - velocity_target(x0, noise).float()).square().mean()}

    def train_step(self, data, optim_wrapper) -> Dict[str, torch.Tensor]:
        """One guarded step (docs/DESIGN.md §11): a non-finite loss or gradient
        skips the update. Returns the finite loss terms and
        ``nonfinite_skips_score``."""
        data = self.data_preprocessor(data, True)
        wrapper = optim_wrapper['score'] if hasattr(optim_wrapper, 'keys') else optim_wrapper
        done = self.nonfinite_guard.step(
            'score', wrapper, self, lambda: (self.loss(data), {}), data=data,
            iteration=_runner_iteration(), named_modules=dict(score=self.score))
        return {**done.losses, **self.nonfinite_guard.log_vars()}

    def forward(self, *args, mode='tensor', **kwargs):
        if mode != 'tensor':
            raise ValueError("FlowMatchingPretrainer.forward supports mode='tensor' only")
        return self.score(*args, **kwargs)


def _runner_iteration():
    """The runner's iteration (mmengine's message hub), or None outside a runner."""
    from mmengine.logging import MessageHub
    return MessageHub.get_current_instance().get_info('iter')
