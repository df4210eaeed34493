"""ZeRO-3 helpers: full values of partitioned parameters, and the parameters a
model declares external (docs/DESIGN.md §7).

Under DeepSpeed ZeRO-3 every parameter keeps only this rank's shard
(``param.ds_tensor``); ``param.data`` is empty outside a gather. The helpers
below gather one parameter at a time, so peak memory is one full tensor, and
are no-ops for ordinary parameters (plain runs, ZeRO 0-2). DeepSpeed is
imported only when a partitioned parameter is met.

Nothing here imports from ``vdot_ext.models``/``engine``/``patches``; models
(LoRA saving), the engine (the DeepSpeed strategy) and tools share it.
"""
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

# Model fact read by register_external_parameters (diffusers style: the model
# declares it, the trainer does not look modules up by name).
EXTERNAL_PARAMETERS_ATTR = '_zero3_bypassed_modules'


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data lives in per-rank ``ds_tensor`` shards)."""
    return hasattr(param, 'ds_id')


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Full values of the ZeRO-3 parameters among ``params`` inside the block.

    Every rank must enter it (a collective). With ``modifier_rank`` the values
    that rank writes are re-partitioned on exit. No-op without partitioned
    parameters."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def gathered_state_dict(module: nn.Module,
                        include: Optional[Callable[[str, torch.Tensor], bool]] = None
                        ) -> Dict[str, torch.Tensor]:
    """CPU copy of ``module.state_dict()`` with ZeRO-3 parameters gathered one
    at a time. ``include(name, tensor)`` selects entries (default: all).
    Every rank must call it; every rank gets the full values."""
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if include is not None and not include(name, tensor):
            continue
        with gathered([tensor]):
            out[name] = tensor.detach().to('cpu', copy=True)
    return out


def load_full_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = False,
                         source: str = 'state dict') -> None:
    """Copy a full (unpartitioned) state dict into ``model``, whose parameters
    may be ZeRO-3 partitioned: each one is gathered, written by rank 0 and
    re-partitioned. Errors name ``source`` and the keys."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f'{source}: missing keys {missing[:5]} ({len(missing)} in all), unexpected keys '
                       f'{unexpected[:5]} ({len(unexpected)} in all)')
    for key, tensor in own.items():
        if key not in state:
            continue
        with gathered([tensor], modifier_rank=0):
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f'{source}: {key} has shape {tuple(state[key].shape)}, the model '
                                 f'{tuple(tensor.shape)}')
            with torch.no_grad():
                tensor.data.copy_(state[key].to(tensor.dtype))


def declared_external_parameters(module: nn.Module) -> List[tuple]:
    """``[(owner, parameter)]`` that ZeRO-3 must treat as external parameters
    of ``owner``.

    A module class declares, in the class attribute ``_zero3_bypassed_modules``,
    the dotted paths of submodules whose ``forward`` it calls as
    ``Block.forward(block, ...)``, bypassing ``block.__call__``. ZeRO-3 gathers
    a module's own parameters in hooks around ``__call__``, so the direct
    parameters of such a block (not those of its children, whose ``__call__``
    runs) must be gathered with the owner instead. A path may name a module or
    a ``ModuleList`` (each element); a path through a ``None`` attribute (e.g.
    no VACE part) names nothing."""
    found = []
    for owner in module.modules():
        for path in getattr(type(owner), EXTERNAL_PARAMETERS_ATTR, ()) or ():
            target = owner
            for part in path.split('.'):
                target = getattr(target, part, None)
                if target is None:
                    break
            if target is None:
                continue
            blocks = list(target) if isinstance(target, (nn.ModuleList, nn.Sequential)) else [target]
            for block in blocks:
                found += [(owner, p) for p in block.parameters(recurse=False)]
    return found


def register_external_parameters(module: nn.Module) -> int:
    """Register every parameter of :func:`declared_external_parameters` with
    DeepSpeed (call before ``deepspeed.initialize`` under ZeRO-3). Returns the
    number registered."""
    pairs = declared_external_parameters(module)
    if pairs:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        for owner, param in pairs:
            register_external_parameter(owner, param)
    return len(pairs)


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its engine files
    (allowed on top of ``safe_torch_load``'s list; none of them runs code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str, field: str, map_location='cpu'):
    """One of DeepSpeed's engine files (model / optimizer states), loaded with
    ``weights_only=True`` and :func:`deepspeed_safe_globals`: never runs code."""
    from .io import safe_torch_load
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return safe_torch_load(path, map_location=map_location, field=field)
