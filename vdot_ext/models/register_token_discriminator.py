"""Register-token discriminator on the fake score's hidden states (D_τ).

VDOT paper §4.3: "we select three blocks, blocks 23, 31, and 39, from the
denoised blocks of the fake score function F_φ. We introduce three learnable
registration tokens that interact with the corresponding blocks through
cross-attention. The resulting outputs are concatenated along the channel
dimension and passed through a linear layer-based classifier that outputs
classification logits." docs/DESIGN.md §3 (Eq. 1) adds the public code's settings: a 512-d
bottleneck, the optional time embedding, LayerNorm → Linear → SiLU → Linear.

Per tap k (hidden states h_k [B, L, D] after main block taps[k])::

    z_k   = W_in · LN(h_k)                          [B, L, d]  (d = bottleneck)
    r_k   = register tokens                          [T, d]     (T = tokens_per_tap)
    a_k   = MHA(query = r_k, key = value = z_k)      [B, T, d]  (the register is the only query)
    feats = concat_k(a_k) [‖ W_t · SiLU(e)]          e = time embedding [B, D]
    logit = Linear(SiLU(Linear(LN(feats))))          [B]

The hidden states are layer-normalised (no affine) before the bottleneck
because the DiT residual stream is unnormalised and its scale grows with depth.
Attention has no positional terms: the discriminator pools a token set.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.registry import MODELS


def default_taps(model_depth: int) -> Tuple[int, ...]:
    """Paper/public-code taps: 14B (40 blocks) → (23, 31, 39), 1.3B (30) →
    (13, 21, 29), i.e. (depth − 17, depth − 9, depth − 1); shallower (test)
    models use (depth//2, 3·depth//4, depth − 1) without duplicates."""
    if model_depth <= 0:
        raise ValueError(f'default_taps: model_depth must be > 0, got '
                         f'{model_depth}')
    if model_depth >= 17:
        return (model_depth - 17, model_depth - 9, model_depth - 1)
    return tuple(sorted({model_depth // 2, (3 * model_depth) // 4,
                         model_depth - 1}))


class RegisterTokenAttentionHead(nn.Module):
    """Learnable register token(s) cross-attending to one tap's hidden states.

    Multi-head scaled dot-product attention (Vaswani et al. 2017) with the
    register tokens as the only queries.
    """

    def __init__(self, model_dim: int, attn_dim: int, tokens: int,
                 num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        # bottleneck projection (identity when attn_dim == model_dim)
        self.proj_in = (nn.Linear(model_dim, attn_dim)
                        if attn_dim != model_dim else nn.Identity())
        self.register_tokens = nn.Parameter(torch.randn(tokens, attn_dim) *
                                            attn_dim**-0.5)
        self.q = nn.Linear(attn_dim, attn_dim)
        self.k = nn.Linear(attn_dim, attn_dim)
        self.v = nn.Linear(attn_dim, attn_dim)
        self.o = nn.Linear(attn_dim, attn_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, model_dim] -> [B, tokens · attn_dim]."""
        b = hidden.shape[0]
        z = self.proj_in(self.norm(hidden))                   # [B, L, d]
        q = self.q(self.register_tokens).expand(b, -1, -1)    # [B, T, d]
        k, v = self.k(z), self.v(z)
        n = self.num_heads

        def split(x):  # [B, S, d] -> [B, n, S, d/n]
            return x.unflatten(-1, (n, -1)).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        a = self.o(a.transpose(1, 2).flatten(2))              # [B, T, d]
        return a.flatten(1)


@MODELS.register_module()
class RegisterTokenDiscriminator(nn.Module):
    """D_τ: register tokens + cross-attention heads + MLP classifier.

    Args:
        model_dim: hidden size of the fake score (WanVACEScore.dim).
        model_depth: number of main blocks of the fake score; ``taps`` are
            validated against it at build time.
        taps: 0-based main-block indices whose output hidden states are read
            (paper 14B: 23, 31, 39; 1.3B: 13, 21, 29).
        tokens_per_tap: register tokens (queries) per tap.
        bottleneck_dim: project hidden states model_dim → bottleneck_dim before
            attention (paper 14B: 512); None: attend in model_dim.
        num_heads: attention heads per tap (must divide the attention dim).
        use_time_emb: also concatenate the (projected) time embedding.
        hidden_dim: classifier hidden width (default: the attention dim).
    """

    def __init__(self,
                 model_dim: int,
                 model_depth: int,
                 taps: Sequence[int] = (23, 31, 39),
                 tokens_per_tap: int = 1,
                 bottleneck_dim: Optional[int] = 512,
                 num_heads: int = 8,
                 use_time_emb: bool = False,
                 hidden_dim: Optional[int] = None):
        super().__init__()
        taps = self._validate_taps(taps, model_depth)
        for name, value in (('model_dim', model_dim),
                            ('model_depth', model_depth),
                            ('tokens_per_tap', tokens_per_tap),
                            ('num_heads', num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'RegisterTokenDiscriminator: {name} must be '
                                 f'a positive int, got {value!r}')
        attn_dim = model_dim if bottleneck_dim is None else bottleneck_dim
        if not isinstance(attn_dim, int) or attn_dim <= 0:
            raise ValueError(f'RegisterTokenDiscriminator: bottleneck_dim '
                             f'must be a positive int or None, got '
                             f'{bottleneck_dim!r}')
        if attn_dim % num_heads:
            which = ('bottleneck_dim' if bottleneck_dim is not None else
                     'model_dim (no bottleneck)')
            raise ValueError(
                f'RegisterTokenDiscriminator: {which} = {attn_dim} is not '
                f'divisible by num_heads = {num_heads}')
        self._taps = taps
        self.model_dim = model_dim
        self.model_depth = model_depth
        self.attn_dim = attn_dim
        self.use_time_emb = bool(use_time_emb)

        self.heads = nn.ModuleList([
            RegisterTokenAttentionHead(model_dim, attn_dim, tokens_per_tap,
                                       num_heads) for _ in taps
        ])
        feat_dim = len(taps) * tokens_per_tap * attn_dim
        if self.use_time_emb:
            self.time_proj = nn.Sequential(nn.SiLU(),
                                           nn.Linear(model_dim, attn_dim))
            feat_dim += attn_dim
        else:
            self.time_proj = None
        hidden_dim = attn_dim if hidden_dim is None else hidden_dim
        self.classifier = nn.Sequential(
            nn.LayerNorm(feat_dim), nn.Linear(feat_dim, hidden_dim),
            nn.SiLU(), nn.Linear(hidden_dim, 1))

    @staticmethod
    def _validate_taps(taps, model_depth) -> Tuple[int, ...]:
        taps = tuple(taps)
        if not taps:
            raise ValueError('RegisterTokenDiscriminator: taps is empty; '
                             'give at least one main-block index')
        for tap in taps:
            if not isinstance(tap, int) or not 0 <= tap < model_depth:
                raise ValueError(
                    f'RegisterTokenDiscriminator: taps={taps} contains '
                    f'{tap!r}, outside [0, model_depth={model_depth}) of the '
                    f'fake score')
        if len(set(taps)) != len(taps):
            raise ValueError(f'RegisterTokenDiscriminator: taps={taps} '
                             f'contains duplicates')
        return taps

    @classmethod
    def for_score(cls, score, taps: Optional[Sequence[int]] = None, **kw):
        """Build for a ``WanVACEScore`` (fills model_dim / model_depth; taps
        default to ``default_taps(score.num_layers)``)."""
        taps = default_taps(score.num_layers) if taps is None else taps
        return cls(model_dim=score.dim, model_depth=score.num_layers,
                   taps=taps, **kw)

    @property
    def taps(self) -> Tuple[int, ...]:
        return self._taps

    def forward(self,
                hidden,
                time_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B] (float32).

        ``hidden``: one [B, L, model_dim] tensor per tap, in ``taps`` order, or
        a ``ScoreFeatures`` from ``WanVACEScore(..., return_hidden_at=taps)``
        (its time embedding is then used). ``time_emb`` [B, model_dim] is
        required when ``use_time_emb`` and ignored otherwise.
        """
        if hasattr(hidden, 'hidden') and hasattr(hidden, 'time_emb'):
            time_emb = hidden.time_emb if time_emb is None else time_emb
            hidden = hidden.hidden
        hidden = list(hidden)
        if len(hidden) != len(self._taps):
            raise ValueError(
                f'RegisterTokenDiscriminator.forward: got {len(hidden)} '
                f'hidden-state tensors, expected {len(self._taps)} (one per '
                f'tap, taps={self._taps}); call the fake score with '
                f'return_hidden_at=disc.taps')
        b = hidden[0].shape[0]
        for tap, h in zip(self._taps, hidden):
            if h.ndim != 3 or h.shape[0] != b or h.shape[2] != self.model_dim:
                raise ValueError(
                    f'RegisterTokenDiscriminator.forward: hidden state of tap '
                    f'{tap} must be [B={b}, L, {self.model_dim}], got '
                    f'{tuple(h.shape)}')
        dtype = self.classifier[1].weight.dtype
        feats = [head(h.to(dtype)) for head, h in zip(self.heads, hidden)]
        if self.use_time_emb:
            if time_emb is None or tuple(time_emb.shape) != (b,
                                                             self.model_dim):
                got = None if time_emb is None else tuple(time_emb.shape)
                raise ValueError(
                    f'RegisterTokenDiscriminator.forward: use_time_emb=True '
                    f'needs time_emb [B={b}, {self.model_dim}], got {got}')
            feats.append(self.time_proj(time_emb.to(dtype)))
        logits = self.classifier(torch.cat(feats, dim=1)).squeeze(1)
        return logits.float()

    def extra_repr(self) -> str:
        return (f'taps={self._taps}, model_dim={self.model_dim}, '
                f'attn_dim={self.attn_dim}, use_time_emb={self.use_time_emb}')
