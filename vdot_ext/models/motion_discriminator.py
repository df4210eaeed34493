"""MoGAN's motion discriminator D_φ on optical-flow stacks (docs/DESIGN.md §13).

MoGAN §4.3 and Appendix A. Input: the raw flows ``o_raw ∈ R^{(T−1)×2×H×W}`` of a clip (from a
frozen :class:`~vdot_ext.models.optical_flow.OpticalFlowEstimator`). The last flow is duplicated
so the stack has T frames, and the per-pixel magnitude is appended as a third channel
(docs/DESIGN.md §13, Eq. 32)::

    õ = [o_1 … o_{T−1}, o_{T−1}]                      T × 2 × H × W
    o = concat_ch(õ, ‖õ‖₂)                             T × 3 × H × W  (the video's shape)

``o`` goes through a Wan2.1-DiT-shaped network:

* **patch embedding** like Wan's ``patch_embedding`` (a Conv3d with kernel = stride = patch), on
  3 channels in pixel space. The default patch (4, 16, 16) is Wan's pixel-to-token compression
  (VAE 4×8×8 times the DiT's 1×2×2), so a 4k+1-frame clip of H×W gives the same (k+1)×H/16×W/16
  token grid as the generator's latents. The time axis is padded at the front by repeating the
  first frame (like Wan's causal first chunk): 4k+1 frames → 4k+4. This embedding is new (its
  input is flow, not latents) and randomly initialised;
* **backbone**: the first N Wan ``DiTBlock``s (1.3B: N = 16), initialised from the teacher's
  ``dit.blocks.0 … N−1`` with its ``time_embedding``, ``time_projection`` and ``text_embedding``.
  The timestep is fixed at t* = 0 and the condition is a fixed prompt embedding ("a video with
  good motion", computed once by the text encoder and given as a buffer), so D judges motion only
  and is deterministic (MoGAN §4.3);
* **multi-scale heads** (Seaweed-APT's heads, MoGAN Appendix A) at chosen depths ``taps`` (1.3B:
  7, 13, 15): each cross-attends with one auxiliary (register) token as the only query over the
  hidden states after that block, then a small MLP. The head outputs are concatenated and a final
  MLP gives one logit::

      a_k   = MHA(query = r_k, key = value = W_k · LN(h_k))          one token per head
      y_k   = W_k2 · SiLU(W_k1 · LN(a_k))                            small MLP
      logit = W_2 · SiLU(W_1 · LN([y_1 ‖ … ‖ y_K]))

Taps are checked against the backbone depth at build time: every tap in [0, N), no duplicates,
and the last block is a tap (blocks after the last tap would never be used or trained).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vdot_ext.models.register_token_discriminator import RegisterTokenAttentionHead
from vdot_ext.models.wan_vace_score import PRESETS, check_rope_head_dim
from vdot_ext.registry import MODELS
from vdot_ext.utils import load_tensor_file

#: MoGAN's fixed discriminator prompt c* (MoGAN §4.3)
MOTION_PROMPT = 'a video with good motion'

_ARCH_FIELDS = ('dim', 'ffn_dim', 'num_heads', 'text_dim', 'freq_dim', 'eps')


def flow_stack(flows: torch.Tensor) -> torch.Tensor:
    """docs/DESIGN.md §13, Eq. 32: [B, T−1, 2, H, W] flows → [B, T, 3, H, W] (u, v, ‖(u, v)‖₂).

    The magnitude uses ``torch.linalg.vector_norm``, whose gradient at a zero flow is 0 (not
    NaN, as ``sqrt(u² + v²)`` would give in static regions).
    """
    if flows.ndim != 5 or flows.shape[2] != 2:
        raise ValueError(f'flow_stack: flows must be [B, T−1, 2, H, W], got {tuple(flows.shape)}')
    stacked = torch.cat((flows, flows[:, -1:]), dim=1)
    magnitude = torch.linalg.vector_norm(stacked, dim=2, keepdim=True)
    return torch.cat((stacked, magnitude), dim=2)


def _load_prompt_embedding(value, field: str) -> torch.Tensor:
    if isinstance(value, str):
        tensors = load_tensor_file(value, field=field)
        if 'prompt_embedding' in tensors:
            value = tensors['prompt_embedding']
        elif len(tensors) == 1:
            value = next(iter(tensors.values()))
        else:
            raise ValueError(f'{field}: {value} holds {sorted(tensors)}; expected one tensor or a '
                             f'"prompt_embedding" entry')
    if not isinstance(value, torch.Tensor):
        raise TypeError(f'{field}: expected a tensor [L, text_dim] / [1, L, text_dim] or a tensor '
                        f'file path, got {type(value).__name__}')
    if value.ndim == 2:
        value = value.unsqueeze(0)
    if value.ndim != 3 or value.shape[0] != 1:
        raise ValueError(f'{field}: expected [L, text_dim] or [1, L, text_dim], got '
                         f'{tuple(value.shape)}')
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f'{field}: the prompt embedding holds NaN/Inf')
    return value.detach().float().clone()


class MotionHead(nn.Module):
    """One multi-scale head: one auxiliary token cross-attends to a tap, then a small MLP."""

    def __init__(self, model_dim: int, attn_dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.attention = RegisterTokenAttentionHead(model_dim, attn_dim, tokens=1, num_heads=num_heads)
        self.mlp = nn.Sequential(nn.LayerNorm(attn_dim), nn.Linear(attn_dim, out_dim), nn.SiLU(),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(hidden))


@MODELS.register_module()
class MotionDiscriminator(nn.Module):
    """D_φ: DiT-based discriminator on optical-flow stacks (MoGAN §4.3, Appendix A).

    Args:
        prompt_embedding: the fixed condition c*, the text encoder's output for
            :data:`MOTION_PROMPT` ([L, text_dim] or [1, L, text_dim]), or a tensor file holding
            it (one tensor, or a ``prompt_embedding`` entry). Stored as a buffer.
        preset: a ``WanVACEScore`` preset name giving the DiT architecture (the teacher's); the
            explicit fields below override it.
        dim, ffn_dim, num_heads, text_dim, freq_dim, eps: Wan DiT block architecture.
        num_blocks: backbone depth N (1.3B paper setting: 16).
        taps: 0-based block indices read by the heads (1.3B: 7, 13, 15); the last must be N − 1.
        patch_size: (t, h, w) of the flow patch embedding (default (4, 16, 16), see module doc).
        flow_scale: flows are divided by it before the patch embedding (1.0: raw pixels).
        head_attn_dim: attention width of each head (None: ``dim``).
        head_attn_heads: attention heads per head.
        head_mlp_dim: width of each head's MLP output (None: the attention width).
        final_hidden_dim: hidden width of the final MLP (None: the head MLP width).
        pretrained: Wan DiT checkpoint file(s) (the teacher's) to initialise the backbone from,
            loaded through ``WanVACEScore``'s checked loader; or call :meth:`init_from_score`.
        gradient_checkpointing: recompute each block in backward (training only).
    """

    def __init__(self,
                 prompt_embedding,
                 preset: Optional[str] = None,
                 *,
                 dim: Optional[int] = None,
                 ffn_dim: Optional[int] = None,
                 num_heads: Optional[int] = None,
                 text_dim: Optional[int] = None,
                 freq_dim: Optional[int] = None,
                 eps: Optional[float] = None,
                 num_blocks: int = 16,
                 taps: Sequence[int] = (7, 13, 15),
                 patch_size: Sequence[int] = (4, 16, 16),
                 flow_scale: float = 1.0,
                 head_attn_dim: Optional[int] = None,
                 head_attn_heads: int = 8,
                 head_mlp_dim: Optional[int] = None,
                 final_hidden_dim: Optional[int] = None,
                 pretrained: Union[str, Sequence[str], None] = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from diffsynth.models.wan_video_dit import DiTBlock, precompute_freqs_cis_3d

        arch = self._resolve_arch(preset, dict(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads,
                                               text_dim=text_dim, freq_dim=freq_dim, eps=eps))
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f'MotionDiscriminator.num_blocks must be a positive int, got {num_blocks!r}')
        self._taps = self.validate_taps(taps, num_blocks)
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) <= 0:
            raise ValueError(f'MotionDiscriminator.patch_size must be 3 positive ints (t, h, w), got '
                             f'{patch_size}')
        if not flow_scale > 0:
            raise ValueError(f'MotionDiscriminator.flow_scale must be > 0, got {flow_scale!r}')
        attn_dim = arch['dim'] if head_attn_dim is None else head_attn_dim
        if not isinstance(attn_dim, int) or attn_dim <= 0 or attn_dim % head_attn_heads:
            raise ValueError(f'MotionDiscriminator.head_attn_dim = {attn_dim!r} must be a positive int '
                             f'divisible by head_attn_heads = {head_attn_heads}')
        mlp_dim = attn_dim if head_mlp_dim is None else head_mlp_dim
        final_dim = mlp_dim if final_hidden_dim is None else final_hidden_dim

        self.arch = arch
        self.preset = preset
        self.num_blocks = num_blocks
        self.patch_size = patch_size
        self.flow_scale = float(flow_scale)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        d = arch['dim']
        self.register_buffer('prompt_embedding',
                             _load_prompt_embedding(prompt_embedding, 'MotionDiscriminator.prompt_embedding'))
        if self.prompt_embedding.shape[-1] != arch['text_dim']:
            raise ValueError(f'MotionDiscriminator.prompt_embedding: last dim '
                             f'{self.prompt_embedding.shape[-1]} != text_dim {arch["text_dim"]}')

        # Wan DiT pieces (names as in diffsynth's WanModel, so teacher weights copy one to one)
        self.patch_embedding = nn.Conv3d(3, d, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(arch['text_dim'], d), nn.GELU(approximate='tanh'),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(arch['freq_dim'], d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList([
            DiTBlock(False, d, arch['num_heads'], arch['ffn_dim'], arch['eps']) for _ in range(num_blocks)
        ])
        # 3-D RoPE tables (plain tensors, as in WanModel; not parameters, not in the state dict)
        self.freqs = precompute_freqs_cis_3d(d // arch['num_heads'])

        self.heads = nn.ModuleList([MotionHead(d, attn_dim, head_attn_heads, mlp_dim) for _ in self._taps])
        feat_dim = len(self._taps) * mlp_dim
        self.final_mlp = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, final_dim), nn.SiLU(),
                                       nn.Linear(final_dim, 1))
        if pretrained is not None:
            self._init_from_pretrained(pretrained)

    # ----------------------------------------------------------- construction
    @staticmethod
    def _resolve_arch(preset, overrides) -> dict:
        if preset is None:
            arch = {}
        elif preset in PRESETS:
            arch = {k: PRESETS[preset][k] for k in _ARCH_FIELDS}
        else:
            raise ValueError(f'MotionDiscriminator.preset: unknown preset {preset!r}; expected one of '
                             f'{sorted(PRESETS)} (or preset=None with {list(_ARCH_FIELDS)})')
        arch.update({k: v for k, v in overrides.items() if v is not None})
        arch.setdefault('eps', 1e-6)
        missing = [k for k in _ARCH_FIELDS if k not in arch]
        if missing:
            raise ValueError(f'MotionDiscriminator: missing architecture field(s) {missing}; give a '
                             f'preset (one of {sorted(PRESETS)}) or set them explicitly')
        for key in ('dim', 'ffn_dim', 'num_heads', 'text_dim', 'freq_dim'):
            if not isinstance(arch[key], int) or arch[key] <= 0:
                raise ValueError(f'MotionDiscriminator.{key} must be a positive int, got {arch[key]!r}')
        if arch['freq_dim'] % 2:
            raise ValueError(f'MotionDiscriminator.freq_dim must be even, got {arch["freq_dim"]}')
        check_rope_head_dim(arch['dim'], arch['num_heads'])
        return arch

    @staticmethod
    def validate_taps(taps, num_blocks: int) -> Tuple[int, ...]:
        """Taps must be distinct ints in [0, num_blocks), and num_blocks − 1 must be one of them."""
        taps = tuple(taps)
        if not taps:
            raise ValueError('MotionDiscriminator.taps is empty; give at least one block index')
        for tap in taps:
            if not isinstance(tap, int) or isinstance(tap, bool) or not 0 <= tap < num_blocks:
                raise ValueError(f'MotionDiscriminator.taps={taps} contains {tap!r}, outside '
                                 f'[0, num_blocks={num_blocks})')
        if len(set(taps)) != len(taps):
            raise ValueError(f'MotionDiscriminator.taps={taps} contains duplicates')
        if max(taps) != num_blocks - 1:
            raise ValueError(f'MotionDiscriminator: num_blocks={num_blocks} but the deepest tap is '
                             f'{max(taps)}; blocks {max(taps) + 1}..{num_blocks - 1} would never be '
                             f'used or trained (set num_blocks={max(taps) + 1})')
        return taps

    @property
    def taps(self) -> Tuple[int, ...]:
        return self._taps

    @classmethod
    def from_score(cls, score, prompt_embedding, num_blocks: int = 16, taps: Sequence[int] = (7, 13, 15),
                   **kwargs) -> 'MotionDiscriminator':
        """Build with a ``WanVACEScore``'s (the teacher's) architecture and initialise from it."""
        arch = {k: score.arch[k] for k in _ARCH_FIELDS}
        disc = cls(prompt_embedding, **arch, num_blocks=num_blocks, taps=taps, **kwargs)
        return disc.init_from_score(score)

    @torch.no_grad()
    def init_from_score(self, score) -> 'MotionDiscriminator':
        """Copy ``score.dit.blocks[:N]``, ``time_embedding``, ``time_projection`` and
        ``text_embedding`` (MoGAN: "the first 16 layers of the pretrained Wan2.1-T2V-1.3B DiT")."""
        dit = score.dit
        mismatched = [k for k in _ARCH_FIELDS if k in score.arch and score.arch[k] != self.arch[k]]
        if mismatched:
            raise ValueError('MotionDiscriminator.init_from_score: architecture differs from the score '
                             'network in ' + ', '.join(f'{k} ({self.arch[k]} vs {score.arch[k]})'
                                                       for k in mismatched))
        if len(dit.blocks) < self.num_blocks:
            raise ValueError(f'MotionDiscriminator.init_from_score: num_blocks={self.num_blocks} but the '
                             f'score network has only {len(dit.blocks)} blocks')
        for name in ('time_embedding', 'time_projection', 'text_embedding'):
            getattr(self, name).load_state_dict(getattr(dit, name).state_dict())
        for mine, theirs in zip(self.blocks, dit.blocks):
            mine.load_state_dict(theirs.state_dict())
        return self

    def _init_from_pretrained(self, pretrained) -> None:
        from vdot_ext.models.wan_vace_score import WanVACEScore
        if self.preset is None:
            raise ValueError('MotionDiscriminator.pretrained needs `preset` (the checkpoint\'s '
                             'architecture, e.g. "wan2.1-t2v-1.3b")')
        teacher = WanVACEScore(self.preset, vace_layers=(), pretrained=pretrained)
        self.init_from_score(teacher)

    # --------------------------------------------------------------- forward
    def embed(self, flows: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """Eq. 32 stack → padded in time → patch tokens [B, f·h·w, dim] and the grid (f, h, w)."""
        stack = flow_stack(flows.float() / self.flow_scale)          # [B, T, 3, H, W]
        x = stack.transpose(1, 2)                                    # [B, 3, T, H, W]
        pt, ph, pw = self.patch_size
        h, w = x.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f'MotionDiscriminator: flow size H×W = {h}×{w} must be divisible by the '
                             f'patch size {ph}×{pw}')
        pad = (-x.shape[2]) % pt
        if pad:
            # causal front padding: repeat the first frame (Wan's 1 + 4k frame layout)
            x = torch.cat((x[:, :, :1].expand(-1, -1, pad, -1, -1), x), dim=2)
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).contiguous(), grid

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, flows: torch.Tensor) -> torch.Tensor:
        """Logits [B] (float32) for raw flows [B, T−1, 2, H, W] (pixels)."""
        if flows.ndim != 5 or flows.shape[2] != 2:
            raise ValueError(f'MotionDiscriminator.forward: flows must be [B, T−1, 2, H, W], got '
                             f'{tuple(flows.shape)}')
        return self.logits_from_tokens(*self.embed(flows))

    def logits_from_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """The backbone and heads on embedded tokens [B, N, dim] of a (f, h, w) grid."""
        from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d
        f, h, w = grid
        b, dtype, d = x.shape[0], x.dtype, self.arch['dim']
        # t* = 0 (MoGAN §4.3): e = time_embedding(sinusoid(0)); adaLN e6 = time_projection(e)
        t = torch.zeros(b, dtype=dtype, device=x.device)
        t_emb = self.time_embedding(sinusoidal_embedding_1d(self.arch['freq_dim'], t))
        t_mod = self.time_projection(t_emb).unflatten(1, (6, d))
        context = self.text_embedding(self.prompt_embedding.to(dtype)).expand(b, -1, -1)
        freqs = torch.cat([
            self.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            self.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            self.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, 1, -1).to(x.device)
        tap_index = {tap: i for i, tap in enumerate(self._taps)}
        hidden = [None] * len(self._taps)
        for i, block in enumerate(self.blocks):
            x = self._run(block, x, context, t_mod, freqs)
            if i in tap_index:
                hidden[tap_index[i]] = x
        features = [head(h_k) for head, h_k in zip(self.heads, hidden)]
        return self.final_mlp(torch.cat(features, dim=1)).squeeze(1).float()

    def extra_repr(self) -> str:
        return (f'preset={self.preset!r}, dim={self.arch["dim"]}, num_blocks={self.num_blocks}, '
                f'taps={self._taps}, patch_size={self.patch_size}, flow_scale={self.flow_scale}')


def encode_motion_prompt(text_encoder, prompt: str = MOTION_PROMPT) -> torch.Tensor:
    """The fixed condition c*: ``text_encoder.encode([prompt])`` → [1, L, text_dim] (computed once;
    save it with ``vdot_ext.utils.save_safetensors({'prompt_embedding': emb}, path)``)."""
    with torch.no_grad():
        emb = text_encoder.encode([prompt])
    return emb.detach().float()
