"""Few-step inference of a VDOT student on one's own Video Condition Unit (docs/DESIGN.md §1, §4, §10).

One sample goes through::

    inputs ──(patches: readers, task builders)──► VCU pixels  V = [T; F; M] (+ refs)
    T ──umT5──► context          (F, M, refs) ──Wan VAE, encode_vcu──► vace_context   (Eq. 9)
    x ← ε_0;  for i < n:  x̂0 = G_θ(x, t_i);  x ← (1 − σ_{i+1})·x̂0 + σ_{i+1}·ε_{i+1}       (Eq. 7, all steps)
    video = VAE.decode(x̂0 without the reference frames)  ──► mp4

with the training schedule: t_i = shift_5(1000 − 1000·i/n), i.e. [1000, 937.5, 833.3,
625] for n = 4 (Eq. 6), and fresh noise ε_{i+1} at every re-noising, exactly as
``VDOTDistiller.rollout`` does in training. The VCU is built by the same code as the
training data (:mod:`vdot_ext.patches`), so a condition means the same thing at both
ends.

**Inputs** (the flags of VACE's ``vace_wan_inference.py``): ``src_video``,
``src_mask``, ``src_ref_images`` and ``prompt``. Without a ``task`` they are the VCU
itself, as VACE reads them (``WanVace.prepare_source``): F = the source video (grey
when absent), M = the mask (all ones when absent), the reference images fitted onto
a white canvas. With a ``task`` (any name of :mod:`vdot_ext.patches.tasks` or an
alias) the task builds F and M from the source video as training does (grey,
scribble, flow, outpainting borders, extension frames, inpainting mask/box, first
frame, references); depth and pose videos are made offline by a model, so for them
``src_video`` (or ``src_condition``) *is* that control video.

**Noise.** ε_0 is diffsynth's (``WanVideoPipeline``: ``torch.Generator('cpu')
.manual_seed(seed)``, reference frames' noise rotated to the front), so a seed means
the same start in both; ε_1, ε_2, … continue the same generator.
"""
import logging
import os
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vdot_ext.models.flow_matching import add_noise, few_step_timesteps, x0_from_velocity

logger = logging.getLogger('vdot_ext.infer')

# VACE's size names (vace/models/wan/configs: SIZE_CONFIGS) → (width, height)
SIZE_NAMES = {'480p': (832, 480), '720p': (1280, 720)}
DEFAULT_FPS = 16  # Wan2.1's sample_fps


# ---------------------------------------------------------------------------
# the schedule and the sampler
# ---------------------------------------------------------------------------
def parse_size(size: str, flag: str = '--size') -> Tuple[int, int]:
    """``'832*480'`` (width*height, VACE's form) or ``'480p'``/``'720p'`` → (width, height)."""
    text = str(size).strip().lower()
    if text in SIZE_NAMES:
        return SIZE_NAMES[text]
    parts = text.replace('x', '*').split('*')
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f'{flag}: expected WIDTH*HEIGHT (e.g. 832*480) or one of {sorted(SIZE_NAMES)}, '
                         f'got {size!r}') from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f'{flag}: width and height must be positive multiples of 16 (8× VAE, 2×2 DiT patches), '
                         f'got {width}*{height}')
    return width, height


def sampling_timesteps(steps: int, sampler: Optional[dict] = None) -> torch.Tensor:
    """The generator's timesteps for ``steps`` steps (docs/DESIGN.md §4, Eq. 6).

    The student's own schedule (``sampler['timesteps']``, training's [1000, 750,
    500, 250]) when ``steps`` equals its length; otherwise ``steps`` evenly spaced
    points 1000·(1 − i/steps) (the same rule, which is also diffsynth's Wan
    schedule). Then the shift ``sampler['shift']`` (5).
    """
    sampler = dict(sampler or {})
    if int(steps) < 1:
        raise ValueError(f'--steps: must be >= 1, got {steps}')
    base = sampler.get('timesteps')
    if base is None or len(base) != int(steps):
        base = [1000.0 * (1 - i / int(steps)) for i in range(int(steps))]
    return few_step_timesteps(base, float(sampler.get('shift', 5.0)))


def initial_noise(shape: Sequence[int], seed: int, num_ref: int = 0) -> Tuple[torch.Tensor, torch.Generator]:
    """ε_0 as diffsynth's ``WanVideoPipeline`` draws it, and the generator that
    continues the sequence (ε_1, ε_2, ...)."""
    generator = torch.Generator('cpu').manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if num_ref:
        # WanVideoUnit_NoiseInitializer: the reference frames' noise is the last f frames'
        noise = torch.cat((noise[:, :, -num_ref:], noise[:, :, :-num_ref]), dim=2)
    return noise, generator


@torch.no_grad()
def sample_student(model, context: torch.Tensor, vace_context: Optional[torch.Tensor], noise: torch.Tensor,
                   timesteps: torch.Tensor, next_noise, progress: bool = False, vace_scale: float = 1.0
                   ) -> torch.Tensor:
    """Run every step of the few-step sampler (docs/DESIGN.md §4, Eq. 7) and return x̂0.

    ``next_noise(i)`` gives ε_i for the re-noising before step i (i ≥ 1). Time and
    noise arithmetic in float32 (``flow_matching``); the network in its own dtype.
    """
    device = next(model.parameters()).device
    x = noise.to(device=device, dtype=torch.float32)
    batch = x.shape[0]
    steps = range(len(timesteps))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc='sampling', unit='step', leave=False)
    x0 = None
    for i in steps:
        if i > 0:
            x = add_noise(x0, next_noise(i).to(device=device, dtype=torch.float32),
                          timesteps[i].expand(batch).to(device))
        t = timesteps[i].expand(batch).to(device)
        v = model(x, t, context, vace_context, vace_scale=vace_scale)
        x0 = x0_from_velocity(x, v.float(), t)
    return x0


class DiffSynthRenoiseScheduler:
    """The student's sampler behind diffsynth's scheduler interface, so that
    ``WanVideoPipeline`` runs an exported student as training does.

    diffsynth's ``FlowMatchScheduler('Wan')`` has the same timesteps for n steps
    and shift 5 (``sigmas = shift(linspace(1, 0, n + 1)[:-1])``) but a
    deterministic Euler step ``x ← x + v·(σ_{i+1} − σ_i)``; the student instead
    predicts x̂0 = x − σ_i·v and re-noises it with fresh noise (Eq. 7). The fresh
    noise continues the pipeline's own seed generator (after ε_0), as
    :func:`initial_noise` does, so both runs see the same noise sequence.
    Use: ``pipe.scheduler = DiffSynthRenoiseScheduler(seed, sampler)``, then call
    the pipeline with ``num_inference_steps=n`` and the same ``seed``;
    ``final_latents`` holds the last x̂0 (reference frames included).
    """

    def __init__(self, seed: int, sampler: Optional[dict] = None):
        self.seed = int(seed)
        self.sampler = dict(sampler or {})
        self.training = False
        self.timesteps = sampling_timesteps(len(self.sampler.get('timesteps', [0] * 4)), self.sampler)
        self.final_latents = None
        self._generator = None

    def set_timesteps(self, num_inference_steps=4, denoising_strength=1.0, shift=None, **unused):
        if denoising_strength != 1.0:
            raise ValueError('DiffSynthRenoiseScheduler: the student samples from pure noise '
                             f'(denoising_strength 1.0), got {denoising_strength}')
        self.timesteps = sampling_timesteps(int(num_inference_steps), self.sampler)
        self.sigmas = self.timesteps / 1000.0
        self._generator = None
        self.final_latents = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **unused) -> torch.Tensor:
        index = int(torch.argmin((self.timesteps - torch.as_tensor(timestep).float().cpu()).abs()))
        t = self.timesteps[index].expand(sample.shape[0]).to(sample.device)
        x0 = x0_from_velocity(sample.float(), model_output.float(), t)
        if index == len(self.timesteps) - 1:
            self.final_latents = x0.detach().cpu()
            return x0.to(sample.dtype)
        if self._generator is None:  # ε_0 was the pipeline's first draw of this generator
            self._generator = torch.Generator('cpu').manual_seed(self.seed)
            torch.randn(tuple(sample.shape), generator=self._generator, dtype=torch.float32)
        noise = torch.randn(tuple(sample.shape), generator=self._generator, dtype=torch.float32)
        t_next = self.timesteps[index + 1].expand(sample.shape[0]).to(sample.device)
        return add_noise(x0, noise.to(sample.device), t_next).to(sample.dtype)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise(original_samples, noise, torch.as_tensor(timestep).reshape(-1))


# ---------------------------------------------------------------------------
# VCU inputs
# ---------------------------------------------------------------------------
@dataclass
class VCURequest:
    """One sample's inputs (the infer flags, or a manifest row's pixels)."""
    prompt: str
    task: Optional[str] = None
    src_video: Optional[str] = None
    src_mask: Optional[str] = None
    src_ref_images: List[str] = field(default_factory=list)
    src_condition: Optional[str] = None
    options: dict = field(default_factory=dict)
    box: Optional[Tuple[int, int, int, int]] = None
    sample_id: str = 'cli'
    negative_prompt: Optional[str] = None


def _reason(exc) -> str:
    """A ``VCUInputError``'s message without its ``sample …, field …, file …:`` prefix."""
    reason = getattr(exc, 'reason', None)
    if reason is not None:
        return reason
    parts = [f'sample {exc.sample}' if getattr(exc, 'sample', None) is not None else None,
             f'field {exc.field!r}' if getattr(exc, 'field', None) is not None else None,
             f'file {exc.path}' if getattr(exc, 'path', None) is not None else None]
    prefix = ', '.join(p for p in parts if p)
    text = str(exc)
    return text[len(prefix) + 2:] if prefix and text.startswith(prefix + ': ') else text


def _flag_error(exc, flag: str):
    """The reader's error re-raised under the flag the user typed."""
    from vdot_ext.patches.video_reader import VCUInputError
    return VCUInputError(_reason(exc), None, flag, exc.path or None)


def _read_clip(path: str, flag: str, frames: int, height: int, width: int, expect=None):
    from vdot_ext.patches.video_reader import VCUInputError, open_video, read_video_frames, sample_frame_indices
    try:
        reader, info = open_video(path, flag)
        if expect is not None and (info.num_frames, info.height, info.width) != expect[1:]:
            raise VCUInputError(f'{info.num_frames} frames of {info.height}×{info.width}, but --src_video '
                                f'{expect[0]} has {expect[1]} of {expect[2]}×{expect[3]} (they must align)',
                                None, flag, path)
        indices = sample_frame_indices(info.num_frames, frames, where=path)
        clip, _ = read_video_frames(path, indices, height, width, 'cover', flag, reader=reader)
    except VCUInputError as exc:
        if exc.field == flag:
            raise
        hint = ' (lower --frame_num)' if 'too few frames' in _reason(exc) else ''
        raise VCUInputError(_reason(exc) + hint, None, flag, path) from None
    return clip, indices, (path, info.num_frames, info.height, info.width)


def build_pixels(request: VCURequest, frames: int, height: int, width: int):
    """The VCU pixels (``patches.tasks.VCUPixels``) of a request (module doc)."""
    from vdot_ext.patches import tasks as T
    from vdot_ext.patches.video_reader import VCUInputError, read_image, read_mask
    video = indices = info = None
    if request.src_video:
        video, indices, info = _read_clip(request.src_video, '--src_video', frames, height, width)
    mask = None
    if request.src_mask:
        if video is None:
            raise VCUInputError('a mask needs --src_video (the frames it masks)', None, '--src_mask',
                                request.src_mask)
        try:
            mask = read_mask(request.src_mask, indices, height, width, 'cover')
        except VCUInputError as exc:
            raise _flag_error(exc, '--src_mask') from None
    refs = []
    for path in request.src_ref_images:
        try:
            refs.append(read_image(path, '--src_ref_images'))
        except VCUInputError as exc:
            raise _flag_error(exc, '--src_ref_images') from None

    if request.task is None:
        return _vace_pixels(video, mask, refs, frames, height, width)

    try:
        name, _ = T.resolve_task(request.task)
    except KeyError as exc:
        raise VCUInputError(str(exc.args[0]), None, '--task') from None
    spec = T.TASKS[name]
    condition = None
    if request.src_condition:
        condition, _, _ = _read_clip(request.src_condition, '--src_condition', frames, height, width, expect=info)
    elif spec.control in T.MODEL_MADE_CONTROLS:
        # a depth/pose video comes from a model run offline: --src_video is that video (VACE's habit)
        condition = video
    if video is None:
        if name not in ('t2v', 'reference') and condition is None:
            raise VCUInputError(f'task {name!r} needs a source video', None, '--src_video')
        video = np.full((frames, height, width, 3), 127, np.uint8) if condition is None else condition
    source = T.SourceSample(request.sample_id, video, condition, mask, refs or None, request.box)
    try:
        return T.build_vcu(request.task, source, request.options)
    except VCUInputError as exc:
        flag = {'mask': '--src_mask', 'ref_images': '--src_ref_images', 'condition': '--src_condition',
                'task': '--task'}.get(exc.field, exc.field)
        raise VCUInputError(_reason(exc), None, flag, exc.path) from None


def _vace_pixels(video, mask, refs, frames: int, height: int, width: int):
    """VACE's VCU from its three inputs as they are (``WanVace.prepare_source``):
    F = src_video or grey, M = src_mask or ones, refs on a white canvas."""
    from vdot_ext.patches import conditions as C
    from vdot_ext.patches.tasks import VCUPixels
    if video is None:
        video = np.full((frames, height, width, 3), 127, np.uint8)
        missing = np.ones(frames, bool)
        task = 'reference' if refs else 't2v'
    else:
        missing = None
        task = 'vace'
    masks = mask if mask is not None else np.ones(frames, bool)
    ref_images = (torch.stack([C.fit_reference(im, height, width, 1.0) for im in refs], dim=1)
                  if refs else None)
    return VCUPixels(task, video, video, masks, missing=missing, ref_images=ref_images)


# ---------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------
@dataclass
class InferenceResult:
    video: torch.Tensor              # [3, T, H, W] in [-1, 1]
    latents: torch.Tensor            # [1, 16, n_ref + F_lat, H/8, W/8], references included
    num_ref: int
    pixels: object                   # the VCUPixels
    seconds: Dict[str, float]


class VDOTInference:
    """Student + codecs on one device, with optional CPU offload of idle modules.

    Args:
        student: the ``WanVACEScore`` (eval); ``sampler``: its schedule
            (``vdot_student.json``), default 4 steps shift 5.
        vae: diffsynth ``WanVideoVAE`` (or ``TinyWanVAE``); ``text_encoder``: an
            object with ``encode(prompts)`` and ``to(device)`` (:mod:`.codecs`).
        device: where the networks run; ``offload``: keep each module on the CPU
            except while it runs (text encoder, VAE, DiT take turns).
    """

    def __init__(self, student, vae, text_encoder, *, sampler: Optional[dict] = None,
                 device: Union[str, torch.device] = 'cpu', offload: bool = False):
        from .codecs import wan_vae_of
        self.student = student
        self.vae = vae
        self.wan_vae = wan_vae_of(vae)
        self.text_encoder = text_encoder
        self.sampler = dict(sampler or {})
        self.device = torch.device(device)
        self.offload = bool(offload) and self.device.type != 'cpu'
        self._modules = dict(student=self.student, vae=self.vae, text_encoder=self.text_encoder)
        for name in self._modules:
            self._place(name, self.device if not self.offload else torch.device('cpu'))
        text_dim = getattr(text_encoder, 'dim', None)
        if text_dim is not None and text_dim != student.arch['text_dim']:
            raise ValueError(f'--text_encoder: its width {text_dim} is not the student\'s text_dim '
                             f'{student.arch["text_dim"]} (a different model family?)')

    @classmethod
    def from_files(cls, ckpt, *, vae: str, text_encoder: str, tokenizer: Optional[str] = None,
                   lora: Optional[str] = None, lora_alpha: Optional[float] = None, config: Optional[str] = None,
                   preset: Optional[str] = None, ema: bool = False, dtype='bf16', device='cpu',
                   offload: bool = False, prefix: str = 'generator.') -> 'VDOTInference':
        """Load the student (:func:`.student.load_student`) and the codecs (:mod:`.codecs`)."""
        from .codecs import load_text_encoder, load_wan_vae
        from .export import as_dtype
        from .student import load_student
        dtype = as_dtype(dtype, '--dtype') or torch.float32
        home = 'cpu' if offload else device
        loaded = load_student(ckpt, lora=lora, lora_alpha=lora_alpha, config=config, preset=preset,
                              prefix=prefix, ema=ema, dtype=dtype, device=home)
        for note in loaded.notes:
            logger.info(note)
        vae_model = load_wan_vae(vae, device=home)
        text = load_text_encoder(text_encoder, tokenizer, device=home, dtype=dtype)
        pipe = cls(loaded.model, vae_model, text, sampler=loaded.sampler, device=device, offload=offload)
        pipe.loaded = loaded
        return pipe

    # ------------------------------------------------------------ placement
    def _place(self, name: str, device: torch.device) -> None:
        module = self._modules[name]
        module.to(device)

    def _use(self, name: str) -> None:
        """Only ``name`` on the device (offload), everything there otherwise."""
        if not self.offload:
            return
        for other in self._modules:
            self._place(other, self.device if other == name else torch.device('cpu'))
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ steps
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        self._use('text_encoder')
        return self.text_encoder.encode(list(prompts)).to(self.device)

    @torch.no_grad()
    def encode_vcu(self, pixels) -> Tuple[torch.Tensor, int]:
        """``vace_context`` [1, 96, n_ref + F_lat, H/8, W/8] (docs/DESIGN.md §4, Eq. 9)."""
        from vdot_ext.patches.vcu import encode_vcu
        self._use('vae')
        frames = pixels.frames_tensor(self.device)[None]
        masks = pixels.masks_tensor(self.device)[None]
        refs = None if pixels.ref_images is None else pixels.ref_images[None].to(self.device)
        return encode_vcu(self.vae, frames, masks, refs).to(self.device), pixels.num_ref

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_ref: int = 0) -> torch.Tensor:
        """[3, T, H, W] in [-1, 1] from latents (the reference frames dropped first)."""
        self._use('vae')
        video = self.wan_vae.decode(latents[:, :, num_ref:].float(), device=self.device)
        return video[0].float().clamp(-1, 1).cpu()

    def timesteps(self, steps: Optional[int] = None) -> torch.Tensor:
        n = steps if steps is not None else len(self.sampler.get('timesteps', [0] * 4))
        return sampling_timesteps(n, self.sampler)

    @torch.no_grad()
    def generate(self, pixels, prompt: str, *, seed: int = 0, steps: Optional[int] = None,
                 progress: bool = True) -> InferenceResult:
        """Encode, sample with the training schedule, decode (module doc)."""
        seconds = {}
        start = time.perf_counter()
        context = self.encode_prompt([prompt])
        seconds['text'] = time.perf_counter() - start
        start = time.perf_counter()
        if self.student.has_vace:
            vace_context, num_ref = self.encode_vcu(pixels)
        else:
            if pixels.task not in ('t2v', ) or pixels.num_ref:
                raise ValueError(f'the student is a text-to-video model (no VACE blocks): it cannot take the '
                                 f'{pixels.task!r} condition; give only --prompt, or a VACE student')
            vace_context, num_ref = None, 0
        seconds['vcu'] = time.perf_counter() - start
        t_frames, h, w = pixels.frames.shape[:3]
        shape = (1, 16, num_ref + (t_frames - 1) // 4 + 1, h // 8, w // 8)
        noise, generator = initial_noise(shape, seed, num_ref)
        timesteps = self.timesteps(steps)

        def next_noise(i):
            return torch.randn(shape, generator=generator, dtype=torch.float32)
        self._use('student')
        start = time.perf_counter()
        latents = sample_student(self.student, context, vace_context, noise, timesteps,
                                 next_noise, progress=progress)
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        seconds['sampling'] = time.perf_counter() - start
        start = time.perf_counter()
        video = self.decode(latents, num_ref)
        seconds['decode'] = time.perf_counter() - start
        return InferenceResult(video=video, latents=latents.cpu(), num_ref=num_ref, pixels=pixels, seconds=seconds)


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------
def write_video_atomic(path: str, video, fps: int = DEFAULT_FPS) -> str:
    """mp4 written beside ``path`` and renamed over it (a reader never sees half a file)."""
    from vdot_ext.data.video_io import write_mp4
    folder = osp.dirname(osp.abspath(path)) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(path)}.{os.getpid()}.tmp.mp4')
    try:
        write_mp4(tmp, video, fps=fps)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.unlink(tmp)
    return path


def side_by_side_panels(result: InferenceResult) -> Tuple[List[torch.Tensor], List[str]]:
    """condition | mask | output (references, if any, first)."""
    from vdot_ext.data.video_io import mask_to_video
    pixels = result.pixels
    panels, labels = [], []
    if pixels.ref_images is not None:
        for j in range(pixels.num_ref):
            panels.append(pixels.ref_images[:, j:j + 1].float())
            labels.append(f'ref {j}')
    panels += [pixels.frames_tensor(), mask_to_video(pixels.masks_tensor()), result.video]
    labels += ['condition', 'mask', 'output']
    return panels, labels


def write_outputs(result: InferenceResult, save_file: str, *, fps: int = DEFAULT_FPS,
                  side_by_side: bool = False) -> Dict[str, str]:
    """The output mp4 and, optionally, ``<name>_sbs.mp4`` (condition | mask | output)."""
    from vdot_ext.data.video_io import side_by_side as stack
    out = dict(video=write_video_atomic(save_file, result.video, fps))
    if side_by_side:
        panels, labels = side_by_side_panels(result)
        root, ext = osp.splitext(save_file)
        out['side_by_side'] = write_video_atomic(f'{root}_sbs{ext or ".mp4"}', stack(panels, labels), fps)
    return out


def manifest_requests(manifest: str, frames: int, height: int, width: int):
    """(index, row, dataset) of every row of a VCU manifest; the pixels come from
    ``dataset.build_pixels(index)``, the training data's own reader."""
    from vdot_ext.patches.vcu_dataset import VCUManifestDataset
    dataset = VCUManifestDataset(manifest, num_frames=frames, height=height, width=width, pixels_only=True)
    return dataset


def seconds_summary(seconds: Dict[str, float]) -> str:
    return ', '.join(f'{k} {v:.2f}s' for k, v in seconds.items()) + f' (total {sum(seconds.values()):.2f}s)'


__all__ = ['VDOTInference', 'DiffSynthRenoiseScheduler', 'VCURequest', 'InferenceResult', 'build_pixels',
           'sample_student', 'initial_noise', 'sampling_timesteps', 'parse_size', 'write_outputs',
           'write_video_atomic', 'manifest_requests']
