"""Wan2.1 DiT (+ optional VACE context blocks) as one score network.

Used for every role of VDOT (generator G_θ, real score F_ψ, fake score F_φ):
the module predicts the rectified-flow velocity ``v = ε − x0`` (docs/DESIGN.md §4).

The network itself is diffsynth's: ``self.dit`` is a
``diffsynth.models.wan_video_dit.WanModel`` and ``self.vace`` a
``diffsynth.models.wan_video_vace.VaceWanModel`` (None for T2V). Only the
forward pass is composed here, because ``WanModel.forward`` is broken in
diffsynth 2.1.12 (its ``patchify`` returns one tensor, the forward unpacks
two). The composition follows ``diffsynth.pipelines.wan_video.model_fn_wan_video``
(T2V/VACE path) operation by operation and is tested against it for equality;
on top it exposes the hidden states after chosen main blocks (read by the
register-token discriminator, VDOT paper §4.3) and the time embedding.

Forward (Wan2.1, Wang et al. 2025; VACE, Jiang et al. 2025)::

    e      = time_embedding(sinusoid(t))                  [B, dim]
    e6     = time_projection(e) -> [B, 6, dim]            (adaLN shift/scale/gate)
    c      = text_embedding(context)
    x      = patchify(x_t)                                [B, f·h·w, dim]
    hints  = VACE blocks on patchify_vace(vace_context) (block 0 adds x)
    for i, block in enumerate(blocks):
        x = block(x, c, e6, rope)
        if i in vace_layers:  x = x + vace_scale · hints[vace_layers.index(i)]
    v      = unpatchify(head(x, e))
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vdot_ext.models.flow_matching import x0_from_velocity
from vdot_ext.registry import MODELS

# Architecture numbers: the "extra_kwargs" of diffsynth 2.1.12's
# diffsynth/configs/model_configs.py entries for Wan-AI/Wan2.1-T2V-1.3B,
# Wan-AI/Wan2.1-T2V-14B, iic/VACE-Wan2.1-1.3B-Preview (VaceWanModel defaults)
# and Wan-AI/Wan2.1-VACE-14B.
_WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                 text_dim=4096, freq_dim=256, in_dim=16, out_dim=16,
                 patch_size=(1, 2, 2), eps=1e-6, vace_in_dim=96)
_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                text_dim=4096, freq_dim=256, in_dim=16, out_dim=16,
                patch_size=(1, 2, 2), eps=1e-6, vace_in_dim=96)
# tiny test models: head dim 48/2 = 24 (diffsynth's 3-D RoPE accepts it)
_TINY = dict(dim=48, ffn_dim=96, num_heads=2, num_layers=4, text_dim=32,
             freq_dim=32, in_dim=16, out_dim=16, patch_size=(1, 2, 2),
             eps=1e-6, vace_in_dim=96)

PRESETS: Dict[str, dict] = {
    'tiny': dict(_TINY, vace_layers=None),
    'tiny-vace': dict(_TINY, vace_layers=(0, 2)),
    'wan2.1-t2v-1.3b': dict(_WAN_1_3B, vace_layers=None),
    'wan2.1-vace-1.3b': dict(_WAN_1_3B, vace_layers=tuple(range(0, 30, 2))),
    'wan2.1-t2v-14b': dict(_WAN_14B, vace_layers=None),
    'wan2.1-vace-14b': dict(_WAN_14B, vace_layers=tuple(range(0, 40, 5))),
}

_ARCH_FIELDS = ('dim', 'ffn_dim', 'num_heads', 'num_layers', 'text_dim',
                'freq_dim', 'in_dim', 'out_dim', 'patch_size', 'eps',
                'vace_layers', 'vace_in_dim')


class ScoreFeatures(NamedTuple):
    """What the score network exposes besides the velocity.

    A NamedTuple, not a dataclass: ZeRO-3 finds a module's output tensors by
    walking tuples, lists and dicts, and registers its backward hooks (which
    gather the module's parameters, and the external ones of
    ``_zero3_bypassed_modules``, before their gradients arrive) on them. A
    gradient that reaches the network only through ``hidden`` (the
    discriminator's GAN step training the fake score) needs those hooks.

    hidden:   hidden states after the requested main blocks (after the VACE
              hint of that block is added), each [B, f·h·w, dim], in the
              requested order.
    time_emb: the time embedding ``e`` (before ``time_projection``), [B, dim].
    grid:     the token grid (f, h, w) after patchify.
    """
    hidden: List[torch.Tensor]
    time_emb: torch.Tensor
    grid: Tuple[int, int, int]


def check_rope_head_dim(dim: int, num_heads: int) -> None:
    """diffsynth's 3-D RoPE splits the head dim d into (d − 2k, k, k), k = d//3.

    ``precompute_freqs_cis(n)`` yields ceil(n/2) complex frequencies, and
    ``rope_apply`` needs them to total d/2: true iff d is even and k is even,
    i.e. d even and d ≢ 4 (mod 6). (16 and 64 fail, 12/24/32/48/128 work.)
    """
    if num_heads <= 0 or dim % num_heads != 0:
        raise ValueError(
            f'WanVACEScore: dim ({dim}) must be divisible by num_heads '
            f'({num_heads})')
    head_dim = dim // num_heads
    if head_dim % 2 != 0 or (head_dim // 3) % 2 != 0:
        raise ValueError(
            f'WanVACEScore: head dim dim/num_heads = {dim}/{num_heads} = '
            f'{head_dim} is not supported by diffsynth\'s 3-D RoPE; expected '
            f'an even head dim not ≡ 4 (mod 6), e.g. 12, 24, 32, 48, 128')


def _resolve_arch(preset: Optional[str], overrides: dict) -> dict:
    if preset is None:
        arch = {}
    elif preset in PRESETS:
        arch = dict(PRESETS[preset])
    else:
        raise ValueError(
            f'WanVACEScore: unknown preset {preset!r}; expected one of '
            f'{sorted(PRESETS)} (or preset=None with all architecture fields)')
    for key, value in overrides.items():
        if key == 'vace_layers':
            if value is not None:  # () = explicitly no VACE
                arch[key] = tuple(value) if len(value) else None
            else:
                arch.setdefault(key, None)
        elif value is not None:
            arch[key] = value
    for key, default in (('in_dim', 16), ('out_dim', 16),
                         ('patch_size', (1, 2, 2)), ('eps', 1e-6),
                         ('vace_in_dim', 96), ('vace_layers', None)):
        arch.setdefault(key, default)
    missing = [k for k in _ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(
            f'WanVACEScore: missing architecture field(s) {missing}; give a '
            f'preset (one of {sorted(PRESETS)}) or set them explicitly')
    arch['patch_size'] = tuple(int(p) for p in arch['patch_size'])
    return arch


def _validate_arch(arch: dict) -> None:
    for key in ('dim', 'ffn_dim', 'num_heads', 'num_layers', 'text_dim',
                'freq_dim', 'in_dim', 'out_dim', 'vace_in_dim'):
        if not isinstance(arch[key], int) or arch[key] <= 0:
            raise ValueError(
                f'WanVACEScore: {key} must be a positive int, got '
                f'{arch[key]!r}')
    if arch['freq_dim'] % 2:
        raise ValueError(
            f'WanVACEScore: freq_dim must be even (sinusoidal embedding '
            f'= [cos, sin] halves), got {arch["freq_dim"]}')
    if len(arch['patch_size']) != 3 or min(arch['patch_size']) <= 0:
        raise ValueError(
            f'WanVACEScore: patch_size must be 3 positive ints (f, h, w), '
            f'got {arch["patch_size"]}')
    check_rope_head_dim(arch['dim'], arch['num_heads'])
    layers = arch['vace_layers']
    if layers is not None:
        layers = list(layers)
        n = arch['num_layers']
        if layers[0] != 0:
            raise ValueError(
                f'WanVACEScore: vace_layers must start at 0 (only VACE block '
                f'0 has before_proj in diffsynth\'s VaceWanModel), got '
                f'{tuple(layers)}')
        if any(not isinstance(i, int) or i < 0 or i >= n for i in layers):
            raise ValueError(
                f'WanVACEScore: vace_layers must be ints in [0, num_layers='
                f'{n}), got {tuple(layers)}')
        if sorted(set(layers)) != layers:
            raise ValueError(
                f'WanVACEScore: vace_layers must be strictly increasing, got '
                f'{tuple(layers)}')


def _as_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace('torch.', '')
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(
            f'WanVACEScore: dtype {dtype!r} is not a torch dtype name '
            f'(expected e.g. "float32", "bfloat16")')
    return value


@MODELS.register_module()
class WanVACEScore(nn.Module):
    """Wan2.1 T2V DiT, or VACE-Wan2.1 (DiT + VACE blocks), predicting velocity.

    Args:
        preset: name in ``PRESETS`` giving the architecture defaults; any
            architecture kwarg given explicitly overrides it.
        dim, ffn_dim, num_heads, num_layers, text_dim, freq_dim, in_dim,
        out_dim, patch_size, eps: ``WanModel`` architecture.
        vace_layers: main-block indices after which a VACE hint is added (None:
            take the preset's; ``()``: no VACE, a T2V model).
        vace_in_dim: channels of ``vace_context`` (96 = 16 inactive + 16
            reactive + 64 mask).
        gradient_checkpointing: recompute every block in backward
            (``torch.utils.checkpoint``, ``use_reentrant=False``) in training.
        pretrained: local checkpoint file(s) (Wan2.1 / VACE release layout,
            also diffusers layout for the DiT), loaded through diffsynth's
            loader and state-dict converters (``checkpoint_io``).
        device: 'meta' builds without allocating weights (parameter counting
            of 14B presets); otherwise where weights are created.
        dtype: parameter dtype (e.g. 'bfloat16'); default float32 (random
            init) or the checkpoint's dtype (pretrained).
    """

    # Facts the trainer reads from the model (diffusers style), docs/DESIGN.md §7:
    # forward() runs each VACE block as ``DiTBlock.forward(block, ...)``
    # (_vace_block), bypassing the block's ``__call__``, so ZeRO-3's gather hooks
    # never fire for the block's own parameters (``modulation``). They are
    # registered as external parameters of this module
    # (vdot_ext.utils.zero.register_external_parameters).
    _zero3_bypassed_modules = ('vace.vace_blocks',)

    def __init__(self,
                 preset: Optional[str] = None,
                 *,
                 dim: Optional[int] = None,
                 ffn_dim: Optional[int] = None,
                 num_heads: Optional[int] = None,
                 num_layers: Optional[int] = None,
                 text_dim: Optional[int] = None,
                 freq_dim: Optional[int] = None,
                 in_dim: Optional[int] = None,
                 out_dim: Optional[int] = None,
                 patch_size: Optional[Sequence[int]] = None,
                 eps: Optional[float] = None,
                 vace_layers: Optional[Sequence[int]] = None,
                 vace_in_dim: Optional[int] = None,
                 gradient_checkpointing: bool = False,
                 pretrained: Union[str, Sequence[str], None] = None,
                 device: Union[str, torch.device, None] = None,
                 dtype: Union[str, torch.dtype, None] = None):
        super().__init__()
        # diffsynth imported here: keeps `import vdot_ext.models` light
        from diffsynth.core.vram.initialization import skip_model_initialization
        from diffsynth.models.wan_video_dit import WanModel
        from diffsynth.models.wan_video_vace import VaceWanModel

        arch = _resolve_arch(
            preset,
            dict(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads,
                 num_layers=num_layers, text_dim=text_dim, freq_dim=freq_dim,
                 in_dim=in_dim, out_dim=out_dim, patch_size=patch_size,
                 eps=eps, vace_layers=vace_layers, vace_in_dim=vace_in_dim))
        _validate_arch(arch)
        self.preset = preset
        self.arch = arch
        self.gradient_checkpointing = bool(gradient_checkpointing)
        dtype = _as_dtype(dtype)

        dit_kwargs = dict(
            dim=arch['dim'], in_dim=arch['in_dim'], ffn_dim=arch['ffn_dim'],
            out_dim=arch['out_dim'], text_dim=arch['text_dim'],
            freq_dim=arch['freq_dim'], eps=arch['eps'],
            patch_size=arch['patch_size'], num_heads=arch['num_heads'],
            num_layers=arch['num_layers'], has_image_input=False)
        vace_kwargs = None
        if arch['vace_layers'] is not None:
            vace_kwargs = dict(
                vace_layers=tuple(arch['vace_layers']),
                vace_in_dim=arch['vace_in_dim'],
                patch_size=arch['patch_size'], has_image_input=False,
                dim=arch['dim'], num_heads=arch['num_heads'],
                ffn_dim=arch['ffn_dim'], eps=arch['eps'])

        on_meta = (pretrained is not None
                   or (device is not None
                       and torch.device(device).type == 'meta'))
        if on_meta:
            # parameters created on 'meta' (no memory, no init); pretrained
            # weights are then assigned (as diffsynth's load_model does).
            # The RoPE tables (plain tensors, not parameters) stay real.
            with skip_model_initialization():
                self.dit = WanModel(**dit_kwargs)
                self.vace = (VaceWanModel(**vace_kwargs)
                             if vace_kwargs else None)
        else:
            self.dit = WanModel(**dit_kwargs)
            self.vace = VaceWanModel(**vace_kwargs) if vace_kwargs else None

        if pretrained is not None:
            from vdot_ext.models.checkpoint_io import load_state_dict_checked, load_wan_vace_state_dict
            dit_sd, vace_sd, files = load_wan_vace_state_dict(
                pretrained, has_vace=self.vace is not None,
                torch_dtype=dtype, field='pretrained')
            load_state_dict_checked(self.dit, dit_sd, files,
                                    'WanVACEScore.dit (field `pretrained`)')
            if self.vace is not None:
                load_state_dict_checked(
                    self.vace, vace_sd, files,
                    'WanVACEScore.vace (field `pretrained`)')
        if device is not None and torch.device(device).type != 'meta':
            self.to(device)
        if dtype is not None:
            self.to(dtype)

    # ------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.dit.blocks)

    @property
    def dim(self) -> int:
        return self.dit.dim

    @property
    def has_vace(self) -> bool:
        return self.vace is not None

    @property
    def vace_layers(self) -> Tuple[int, ...]:
        return tuple(self.vace.vace_layers) if self.vace is not None else ()

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.patch_embedding.weight.dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = bool(enabled)

    # --------------------------------------------------------------- helpers
    def _run(self, fn, *args):
        """Call ``fn(*args)``, recomputed in backward when checkpointing."""
        if (self.gradient_checkpointing and self.training
                and torch.is_grad_enabled()):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @staticmethod
    def _vace_block(block, c, x, context, t_mod, freqs):
        """One ``VaceWanAttentionBlock`` without its hint-stacking bookkeeping.

        diffsynth stacks all hints into one growing tensor and unbinds it at
        every block (copies only); this computes the same two outputs
        directly: c_{k+1} = DiTBlock(c_k [+ before_proj]), hint_k = after_proj.
        """
        if block.block_id == 0:
            c = block.before_proj(c) + x
        from diffsynth.models.wan_video_dit import DiTBlock
        c = DiTBlock.forward(block, c, context, t_mod, freqs)
        return c, block.after_proj(c)

    def _check_inputs(self, x_t, t, context, vace_context):
        a = self.arch
        if x_t.ndim != 5 or x_t.shape[1] != a['in_dim']:
            raise ValueError(
                f'WanVACEScore.forward: x_t must be [B, {a["in_dim"]}, F, H, '
                f'W], got {tuple(x_t.shape)}')
        p = a['patch_size']
        if any(s % q for s, q in zip(x_t.shape[2:], p)):
            raise ValueError(
                f'WanVACEScore.forward: x_t spatial/temporal size '
                f'{tuple(x_t.shape[2:])} must be divisible by patch_size {p}')
        b = x_t.shape[0]
        if context.ndim != 3 or context.shape[0] != b \
                or context.shape[2] != a['text_dim']:
            raise ValueError(
                f'WanVACEScore.forward: context must be [B={b}, L, '
                f'{a["text_dim"]}], got {tuple(context.shape)}')
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(
                f'WanVACEScore.forward: t must be a scalar or [B={b}], got '
                f'{tuple(t.shape)}')
        if vace_context is not None:
            if self.vace is None:
                raise ValueError(
                    'WanVACEScore.forward: vace_context given but this model '
                    'has no VACE blocks (vace_layers=None); build a VACE '
                    'preset or drop vace_context')
            want = (b, a['vace_in_dim']) + tuple(x_t.shape[2:])
            if tuple(vace_context.shape) != want:
                raise ValueError(
                    f'WanVACEScore.forward: vace_context must be {list(want)} '
                    f'(B, vace_in_dim, F, H, W of x_t), got '
                    f'{list(vace_context.shape)}')

    # --------------------------------------------------------------- forward
    def forward(self,
                x_t: torch.Tensor,
                t: torch.Tensor,
                context: torch.Tensor,
                vace_context: Optional[torch.Tensor] = None,
                *,
                vace_scale: Union[float, torch.Tensor] = 1.0,
                return_hidden_at: Sequence[int] = ()):
        """Velocity prediction v(x_t, t | context, vace_context).

        Returns ``v`` [B, out_dim, F, H, W] in the network's dtype, or
        ``(v, ScoreFeatures)`` when ``return_hidden_at`` is non-empty.
        """
        from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d

        dit = self.dit
        t = torch.as_tensor(t, device=x_t.device)
        self._check_inputs(x_t, t, context, vace_context)
        capture = [int(i) for i in return_hidden_at]
        bad = [i for i in capture if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f'WanVACEScore.forward: return_hidden_at {bad} outside '
                f'[0, num_layers={self.num_layers})')
        dtype = self.dtype
        b = x_t.shape[0]
        x_t = x_t.to(dtype)
        context = context.to(dtype)
        # docs/DESIGN.md §4: the timestep tensor given to the DiT has the DiT's dtype
        # (sinusoidal_embedding_1d computes in float64, returns t's dtype)
        t = t.to(dtype).reshape(-1).expand(b)

        # time: e = time_embedding(sinusoid(t)); e6 = time_projection(e)
        t_emb = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, t))
        t_mod = dit.time_projection(t_emb).unflatten(1, (6, dit.dim))
        context = dit.text_embedding(context)

        # patchify: Conv3d with stride = kernel = patch_size, then tokens
        x = dit.patch_embedding(x_t)
        f, h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2).contiguous()  # b c f h w -> b (fhw) c

        # 3-D RoPE: per-axis tables (frame, height, width) broadcast to grid
        freqs = torch.cat([
            dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, 1, -1).to(x.device)

        hints = None
        if vace_context is not None:
            c = self.vace.vace_patch_embedding(vace_context.to(dtype))
            # contiguous like diffsynth's torch.cat (same bf16 matmul kernels)
            c = c.flatten(2).transpose(1, 2).contiguous()
            hints = []
            for block in self.vace.vace_blocks:
                c, hint = self._run(self._vace_block, block, c, x, context,
                                    t_mod, freqs)
                hints.append(hint)
            mapping = self.vace.vace_layers_mapping
            if isinstance(vace_scale, torch.Tensor) and vace_scale.ndim > 0:
                vace_scale = vace_scale.to(x).reshape(-1, 1, 1)

        hidden = {}
        for i, block in enumerate(dit.blocks):
            x = self._run(block, x, context, t_mod, freqs)
            if hints is not None and i in mapping:
                x = x + hints[mapping[i]] * vace_scale
            if i in capture:
                hidden[i] = x

        x = dit.head(x, t_emb)
        v = dit.unpatchify(x, (f, h, w))
        if not capture:
            return v
        return v, ScoreFeatures(hidden=[hidden[i] for i in capture],
                                time_emb=t_emb, grid=(f, h, w))

    def predict_x0(self, x_t, t, context, vace_context=None, **kw):
        """x0 = x_t − σ·v (float32 conversion, flow_matching.x0_from_velocity).

        Returns x0 (in x_t's dtype), or ``(x0, ScoreFeatures)`` when
        ``return_hidden_at`` is given.
        """
        out = self(x_t, t, context, vace_context, **kw)
        v, feats = out if isinstance(out, tuple) else (out, None)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(
            x_t.shape[0])
        x0 = x0_from_velocity(x_t, v, t)
        return x0 if feats is None else (x0, feats)

    def extra_repr(self) -> str:
        a = self.arch
        return (f'preset={self.preset!r}, dim={a["dim"]}, '
                f'layers={a["num_layers"]}, heads={a["num_heads"]}, '
                f'vace_layers={a["vace_layers"]}, '
                f'gradient_checkpointing={self.gradient_checkpointing}')


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on 'meta' modules)."""
    return sum(math.prod(p.shape) for p in module.parameters())
