"""Frozen, differentiable optical-flow estimators F for the MoGAN recipe (docs/DESIGN.md §13).

MoGAN §3.2 / §4.1: a flow estimator maps a video ``x ∈ [-1, 1]^{T×3×H×W}`` to the flow stack
``o = F(x) ∈ R^{(T−1)×2×H×W}``, where ``o[t]`` is the flow from frame t to frame t+1 *in pixels*,
under brightness constancy ``I_{t+1}(p + o_t(p)) ≈ I_t(p)``. Channel 0 is the horizontal
displacement u (x, to the right), channel 1 the vertical displacement v (y, downwards), as in
RAFT and torchvision.

Every estimator here is an :class:`OpticalFlowEstimator`:

* its weights are frozen and it stays in eval mode (``train()`` is a no-op), so no optimizer
  ever changes it and no batch statistics move;
* it is differentiable with respect to the input frames, so that a GAN loss on the flows of a
  decoded generator sample reaches the generator (MoGAN §4.1, x̂0 → decode → F → D).

Entries (registered in ``MODELS``):

* :class:`RAFTFlow` — torchvision's RAFT (``raft_large`` / ``raft_small``; Teed & Deng 2020),
  the estimator of the MoGAN paper, with weights read from a **local file only** (never
  downloaded). torchvision's RAFT detaches its coordinate recurrence between refinement steps
  (the RAFT paper's choice); gradients still reach the frames through the feature and context
  encoders and the correlation look-ups.
* :class:`LucasKanadeFlow` — a weight-free, CPU-sized estimator for the demo, the tests and the
  default motion metrics: coarse-to-fine Lucas–Kanade (Lucas & Kanade 1981; pyramidal form of
  Bouguet 2001) with Gaussian-weighted structure tensors, Tikhonov-regularised 2×2 solves and
  a fixed number of warps per level. Every operation (bilinear warping, convolutions, the
  closed-form 2×2 inverse) is differentiable. Its end-point error on synthetic translations and
  rotations is measured in ``tests/test_optical_flow.py``.
"""
import math
import os
import os.path as osp
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.registry import MODELS
from vdot_ext.utils import assert_finite_state_dict, load_tensor_file

# ITU-R BT.601 luma weights (what cv2.COLOR_RGB2GRAY uses)
_LUMA = (0.299, 0.587, 0.114)


def check_video(video: torch.Tensor, owner: str, min_frames: int = 2) -> None:
    """``video`` must be a floating tensor [B, T, 3, H, W] with T ≥ ``min_frames``."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f'{owner}: video must be a torch.Tensor [B, T, 3, H, W], got '
                        f'{type(video).__name__}')
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f'{owner}: video must be [B, T, 3, H, W] (RGB in [-1, 1]), got '
                         f'{tuple(video.shape)}')
    if video.shape[1] < min_frames:
        raise ValueError(f'{owner}: video needs at least {min_frames} frames, got T={video.shape[1]}')
    if not video.is_floating_point():
        raise TypeError(f'{owner}: video must be floating point in [-1, 1], got {video.dtype}')


class OpticalFlowEstimator(nn.Module):
    """Base class: video [B, T, 3, H, W] in [-1, 1] → flows [B, T−1, 2, H, W] in pixels.

    Subclasses implement :meth:`pair_flow` on frame pairs [N, 3, H, W]. ``pairs_per_call``
    bounds how many frame pairs go through one call (memory); None = all at once.
    """

    def __init__(self, pairs_per_call: Optional[int] = None):
        super().__init__()
        if pairs_per_call is not None and (not isinstance(pairs_per_call, int) or pairs_per_call <= 0):
            raise ValueError(f'{type(self).__name__}.pairs_per_call must be a positive int or None, '
                             f'got {pairs_per_call!r}')
        self.pairs_per_call = pairs_per_call

    @property
    def name(self) -> str:
        """A short description recorded with metrics (which estimator produced them)."""
        return type(self).__name__

    def freeze(self) -> 'OpticalFlowEstimator':
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> 'OpticalFlowEstimator':
        # frozen estimator: always eval (RAFT has BatchNorm layers whose statistics must not move)
        return super().train(False)

    def pair_flow(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        """Flow [N, 2, H, W] (pixels) from ``image1`` to ``image2``, both [N, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video, type(self).__name__)
        b, t, c, h, w = video.shape
        first = video[:, :-1].reshape(b * (t - 1), c, h, w)
        second = video[:, 1:].reshape(b * (t - 1), c, h, w)
        flows = self.flow_pairs(first, second)
        return flows.reshape(b, t - 1, 2, h, w)

    def flow_pairs(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """:meth:`pair_flow` over [N, 3, H, W] pairs, ``pairs_per_call`` at a time."""
        step = self.pairs_per_call or first.shape[0]
        parts = [self.pair_flow(first[i:i + step], second[i:i + step])
                 for i in range(0, first.shape[0], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- RAFT
_RAFT_VARIANTS = {
    # variant: (torchvision builder name, weights enum name, default weights entry)
    'large': ('raft_large', 'Raft_Large_Weights', 'C_T_SKHT_V2'),
    'small': ('raft_small', 'Raft_Small_Weights', 'C_T_V2'),
}


def raft_weight_file_name(variant: str = 'large', weights: Optional[str] = None) -> str:
    """torchvision's file name for a RAFT weights entry, e.g. ``raft_large_C_T_SKHT_V2-ff5fadd5.pth``.

    Read from torchvision's weights enum (its download URL's last component); nothing is fetched.
    """
    if variant not in _RAFT_VARIANTS:
        raise ValueError(f'RAFTFlow.variant must be one of {sorted(_RAFT_VARIANTS)}, got {variant!r}')
    from torchvision.models import optical_flow as tv_flow
    _, enum_name, default = _RAFT_VARIANTS[variant]
    enum = getattr(tv_flow, enum_name)
    entry = default if weights is None else weights
    names = [member.name for member in enum]
    if entry not in names:
        raise ValueError(f'RAFTFlow.weights: {entry!r} is not a torchvision {enum_name} entry; '
                         f'expected one of {names}')
    return enum[entry].url.rsplit('/', 1)[-1]


def _torch_hub_checkpoint_dir() -> str:
    """Where torchvision caches downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


@MODELS.register_module()
class RAFTFlow(OpticalFlowEstimator):
    """torchvision RAFT (Teed & Deng 2020) with weights from a local file; frozen, differentiable.

    Args:
        variant: ``'large'`` (``raft_large``, the MoGAN paper's estimator) or ``'small'``.
        weights_path: the weight file (torchvision's state dict, ``.pth`` or ``.safetensors``), or
            a directory holding torchvision's file name. None: torchvision's cache directory
            ``$TORCH_HOME/hub/checkpoints`` (where ``raft_large(weights=...)`` would have put it).
            Nothing is downloaded: a missing file is an error naming the expected file.
        weights: torchvision weights entry whose file name is expected (default ``C_T_SKHT_V2``
            for large, ``C_T_V2`` for small).
        num_flow_updates: RAFT refinement iterations (torchvision's default 12; VBench uses 20).
        pairs_per_call: frame pairs per RAFT call (memory bound); None = all.

    RAFT needs H and W that are multiples of 8 and at least 128 (its correlation pyramid has 4
    levels below 1/8 resolution). Frames smaller than ``min_size`` are bilinearly upsampled to it
    and the flow is resampled back and rescaled to input pixels; sides that are not multiples of
    8 are padded by edge replication and the flow is cropped back.
    """

    def __init__(self,
                 variant: str = 'large',
                 weights_path: Optional[str] = None,
                 weights: Optional[str] = None,
                 num_flow_updates: int = 12,
                 min_size: int = 128,
                 pairs_per_call: Optional[int] = None):
        super().__init__(pairs_per_call)
        if not isinstance(min_size, int) or min_size < 128 or min_size % 8:
            raise ValueError(f'RAFTFlow.min_size must be a multiple of 8 and ≥ 128 (RAFT\'s correlation '
                             f'pyramid), got {min_size!r}')
        self.min_size = min_size
        file_name = raft_weight_file_name(variant, weights)
        if not isinstance(num_flow_updates, int) or num_flow_updates <= 0:
            raise ValueError(f'RAFTFlow.num_flow_updates must be a positive int, got {num_flow_updates!r}')
        path = self.resolve_weights_path(weights_path, file_name)
        from torchvision.models import optical_flow as tv_flow
        builder = getattr(tv_flow, _RAFT_VARIANTS[variant][0])
        model = builder(weights=None, progress=False)  # architecture only: no download
        state = load_tensor_file(path, field='RAFTFlow.weights_path')
        assert_finite_state_dict(state, path)
        mine = model.state_dict()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        mis_shaped = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
        if missing or unexpected or mis_shaped:
            raise ValueError(
                f'RAFTFlow.weights_path: {path} is not a torchvision raft_{variant} state dict '
                f'(expected {file_name}): missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, '
                f'shape mismatches {mis_shaped[:5]}')
        model.load_state_dict(state)
        self.model = model
        self.variant = variant
        self.weights_path = path
        self.num_flow_updates = num_flow_updates
        self.freeze()

    @staticmethod
    def resolve_weights_path(weights_path: Optional[str], file_name: str) -> str:
        if weights_path is None:
            candidate = osp.join(_torch_hub_checkpoint_dir(), file_name)
            where = f'torchvision\'s cache directory {_torch_hub_checkpoint_dir()}'
        else:
            weights_path = os.fspath(weights_path)
            candidate = osp.join(weights_path, file_name) if osp.isdir(weights_path) else weights_path
            where = repr(weights_path)
        if not osp.isfile(candidate):
            raise FileNotFoundError(
                f'RAFTFlow.weights_path: no RAFT weight file at {candidate!r} (looked in {where}). '
                f'Expected torchvision\'s file {file_name!r}; nothing is downloaded: copy it there '
                f'or set weights_path to the local file.')
        return candidate

    @property
    def name(self) -> str:
        return f'RAFTFlow(raft_{self.variant}, {osp.basename(self.weights_path)})'

    def pair_flow(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        h, w = image1.shape[-2:]
        dtype = next(self.model.parameters()).dtype
        image1, image2 = image1.to(dtype), image2.to(dtype)
        if min(h, w) < self.min_size:
            factor = self.min_size / min(h, w)
            size = (max(self.min_size, round(h * factor)), max(self.min_size, round(w * factor)))
            flow = self._raft(_resize(image1, size), _resize(image2, size))
            return resize_flow(flow, (h, w))
        return self._raft(image1, image2)

    def _raft(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        h, w = image1.shape[-2:]
        pad_h, pad_w = (-h) % 8, (-w) % 8
        if pad_h or pad_w:
            # replicate padding keeps edge content; the flow is cropped back below
            image1 = F.pad(image1, (0, pad_w, 0, pad_h), mode='replicate')
            image2 = F.pad(image2, (0, pad_w, 0, pad_h), mode='replicate')
        flow = self.model(image1, image2, num_flow_updates=self.num_flow_updates)[-1]
        return flow[..., :h, :w]


# ---------------------------------------------------------------------- Lucas–Kanade
def to_gray(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [-1, 1] → [N, 1, H, W] luma in [0, 1] (BT.601 weights)."""
    weights = frames.new_tensor(_LUMA).view(1, 3, 1, 1)
    return ((frames + 1.0) * 0.5 * weights).sum(dim=1, keepdim=True)


def _gaussian_kernel1d(sigma: float, dtype, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma)**2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] with replicate borders."""
    if sigma <= 0:
        return image
    kernel = _gaussian_kernel1d(sigma, image.dtype, image.device)
    radius = kernel.numel() // 2
    c = image.shape[1]
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode='replicate'), kx, groups=c)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode='replicate'), ky, groups=c)


def image_gradients(image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Central differences (∂/∂x, ∂/∂y) of [N, 1, H, W], one-sided at the borders."""
    padded = F.pad(image, (1, 1, 1, 1), mode='replicate')
    grad_x = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    grad_y = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return grad_x, grad_y


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: ``out(p) = image(p + flow(p))``, bilinear, border replication.

    image [N, C, H, W], flow [N, 2, H, W] in pixels (u = x, v = y). Differentiable in both.
    """
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                            torch.arange(w, dtype=flow.dtype, device=flow.device), indexing='ij')
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    # align_corners=True: normalised −1/+1 are the centres of the first/last pixels
    grid = torch.stack((2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0), dim=-1)
    return F.grid_sample(image, grid.to(image.dtype), mode='bilinear', padding_mode='border',
                         align_corners=True)


def _resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image, size=size, mode='bilinear', align_corners=True)


def resize_flow(flow: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resample a flow field to ``size`` and rescale its pixel units (align_corners geometry)."""
    h, w = flow.shape[-2:]
    out = _resize(flow, size)
    scale_x = (size[1] - 1) / max(w - 1, 1)
    scale_y = (size[0] - 1) / max(h - 1, 1)
    return torch.cat((out[:, :1] * scale_x, out[:, 1:] * scale_y), dim=1)


@MODELS.register_module()
class LucasKanadeFlow(OpticalFlowEstimator):
    """Coarse-to-fine Lucas–Kanade optical flow in torch: weight-free, differentiable, CPU-sized.

    Per pyramid level (coarsest first; the flow from the coarser level is upsampled and rescaled),
    ``warps`` times::

        I2w      = I2(p + o(p))                          bilinear backward warp
        Ix, Iy   = ∇((I1 + I2w) / 2),   It = I2w − I1    central differences
        J        = G_σ * [[Ix², IxIy], [IxIy, Iy²]]       Gaussian-weighted structure tensor
        r        = G_σ * [IxIt, IyIt]
        Δo       = −(J + λ·I)⁻¹ r                         closed-form 2×2 solve
        o        = o + Δo

    λ (Tikhonov) keeps the solve finite where the image is flat (the aperture problem): there the
    update tends to 0 instead of exploding. Each level's images are high-passed first,
    ``I − G_{σ_hp} * I`` (the structure–texture split of Wedel et al. 2009), so a brightness change
    between frames that is smooth in space (global flicker, slow illumination changes) is not
    mistaken for motion. Luma is in [0, 1]; λ is in those units squared.

    Args:
        levels: pyramid levels (each halves H and W); capped so the coarsest side is ≥ ``min_size``.
        warps: warp/solve iterations per level (a fixed number: the graph size is fixed).
        window_sigma: σ (pixels) of the Gaussian window of the structure tensor.
        presmooth_sigma: σ of the Gaussian applied to each level's images before differentiation.
        regularization: λ.
        min_size: smallest pyramid side.
        highpass_sigma: σ_hp (pixels of each level) of the high-pass; None switches it off.
        pairs_per_call: see :class:`OpticalFlowEstimator`.
    """

    def __init__(self,
                 levels: int = 3,
                 warps: int = 2,
                 window_sigma: float = 3.0,
                 presmooth_sigma: float = 0.5,
                 regularization: float = 1e-4,
                 min_size: int = 8,
                 highpass_sigma: Optional[float] = 5.0,
                 pairs_per_call: Optional[int] = None):
        super().__init__(pairs_per_call)
        for field, value in (('levels', levels), ('warps', warps), ('min_size', min_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'LucasKanadeFlow.{field} must be a positive int, got {value!r}')
        for field, value in (('window_sigma', window_sigma), ('regularization', regularization)):
            if not value > 0:
                raise ValueError(f'LucasKanadeFlow.{field} must be > 0, got {value!r}')
        if not presmooth_sigma >= 0:
            raise ValueError(f'LucasKanadeFlow.presmooth_sigma must be ≥ 0, got {presmooth_sigma!r}')
        self.levels = levels
        self.warps = warps
        self.window_sigma = float(window_sigma)
        self.presmooth_sigma = float(presmooth_sigma)
        self.regularization = float(regularization)
        self.min_size = min_size
        if highpass_sigma is not None and not highpass_sigma > 0:
            raise ValueError(f'LucasKanadeFlow.highpass_sigma must be > 0 or None, got {highpass_sigma!r}')
        self.highpass_sigma = None if highpass_sigma is None else float(highpass_sigma)

    @property
    def name(self) -> str:
        return (f'LucasKanadeFlow(levels={self.levels}, warps={self.warps}, '
                f'window_sigma={self.window_sigma}, highpass_sigma={self.highpass_sigma})')

    def _pyramid_sizes(self, h: int, w: int):
        sizes = [(h, w)]
        while len(sizes) < self.levels:
            ph, pw = sizes[-1]
            nh, nw = (ph + 1) // 2, (pw + 1) // 2
            if min(nh, nw) < self.min_size:
                break
            sizes.append((nh, nw))
        return sizes[::-1]  # coarsest first

    def _solve(self, image1, image2, flow):
        warped = warp(image2, flow)
        grad_x, grad_y = image_gradients(0.5 * (image1 + warped))
        grad_t = warped - image1
        products = torch.cat((grad_x * grad_x, grad_x * grad_y, grad_y * grad_y,
                              grad_x * grad_t, grad_y * grad_t), dim=1)
        j11, j12, j22, r1, r2 = gaussian_blur(products, self.window_sigma).unbind(dim=1)
        lam = self.regularization
        a, d = j11 + lam, j22 + lam
        det = a * d - j12 * j12  # ≥ λ² > 0: J is positive semi-definite
        du = -(d * r1 - j12 * r2) / det
        dv = -(a * r2 - j12 * r1) / det
        return flow + torch.stack((du, dv), dim=1)

    def pair_flow(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        dtype = image1.dtype if image1.dtype in (torch.float32, torch.float64) else torch.float32
        gray1, gray2 = to_gray(image1.to(dtype)), to_gray(image2.to(dtype))
        h, w = gray1.shape[-2:]
        sizes = self._pyramid_sizes(h, w)
        flow = None
        for size in sizes:
            level1 = gray1 if size == (h, w) else _resize(gaussian_blur(gray1, 1.0), size)
            level2 = gray2 if size == (h, w) else _resize(gaussian_blur(gray2, 1.0), size)
            level1 = gaussian_blur(level1, self.presmooth_sigma)
            level2 = gaussian_blur(level2, self.presmooth_sigma)
            if self.highpass_sigma:
                level1 = level1 - gaussian_blur(level1, self.highpass_sigma)
                level2 = level2 - gaussian_blur(level2, self.highpass_sigma)
            if flow is None:
                flow = level1.new_zeros(level1.shape[0], 2, *size)
            else:
                flow = resize_flow(flow, size)
            for _ in range(self.warps):
                flow = self._solve(level1, level2, flow)
        return flow


def build_flow_estimator(cfg: Union[None, dict, OpticalFlowEstimator]) -> OpticalFlowEstimator:
    """An estimator from a config dict (registry ``type``), an instance, or None (the weight-free
    :class:`LucasKanadeFlow` with its defaults)."""
    if cfg is None:
        return LucasKanadeFlow()
    if isinstance(cfg, OpticalFlowEstimator):
        return cfg
    if isinstance(cfg, dict):
        estimator = MODELS.build(dict(cfg))
        if not isinstance(estimator, OpticalFlowEstimator):
            raise TypeError(f'flow estimator config {cfg!r} built a {type(estimator).__name__}, '
                            'expected an OpticalFlowEstimator (RAFTFlow, LucasKanadeFlow, ...)')
        return estimator
    raise TypeError(f'flow estimator: expected None, a config dict or an OpticalFlowEstimator, '
                    f'got {type(cfg).__name__}')
