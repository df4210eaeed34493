"""The guarded optimizer step: a non-finite step never reaches the weights (docs/DESIGN.md §11).

Every trainable role of ``VDOTDistiller`` and ``FlowMatchingPretrainer`` steps through
:meth:`NonFiniteGuard.step`, which replaces ``OptimWrapper.update_params(loss)``::

    with wrapper.optim_context(module):
        losses = compute()                       # a NonFiniteError raised here → skip
    loss = Σ losses
    if loss is not finite:                       skip (no backward)
    wrapper.backward(wrapper.scale_loss(loss))
    if the gradients are not finite:             wrapper.zero_grad(); skip
    elif wrapper.should_update():                wrapper.step(); wrapper.zero_grad()

which is mmengine 0.10.7's ``OptimWrapper.update_params`` (loss scaling for gradient accumulation,
``should_update``, gradient clipping inside ``step``) with two checks added. The gradient check uses
``wrapper.grads_finite()`` when the wrapper defines it (the DeepSpeed role wrapper, whose gradients live
in the engine's partitions), else ``p.grad`` of the parameters in ``wrapper.optimizer.param_groups``.

Gradient accumulation (``accumulative_counts`` = n > 1):

* a skipped loss runs no backward, so ``_inner_count`` does not advance: the batch is as if it had not
  been drawn and the window takes the next batch instead;
* non-finite gradients discard the whole window (``zero_grad``): the good micro-batches before it in the
  same window are lost with it, because their gradients are summed into the same buffers.

Skips are counted per role in buffers (saved with the model, so a resumed run keeps its counts):
``skips_<role>`` (total) and ``consecutive_<role>`` (since the role's last real step). After
``max_consecutive`` consecutive skips of one role the step raises ``RuntimeError``. With several
processes every rank takes the same decision (the flags are max-reduced; ``grads_finite()`` must answer
for all ranks), so no rank runs a collective backward or step alone, and the warning lists every rank's
batch. The losses raise ``NonFiniteError`` only after all module forwards of the step, so under ZeRO-3
no rank leaves a parameter all-gather early.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.logging import print_log

from vdot_ext.utils import NonFiniteError

__all__ = ['NonFiniteGuard', 'GuardedStep', 'describe_batch']

# batch keys that name the samples in skip messages (besides keys ending in 'path'/'paths')
_ID_KEYS = ('sample_id', 'index')
_MAX_LISTED = 16


@dataclass
class GuardedStep:
    """What one guarded step did.

    ``losses``: the loss terms (detached), finite ones only; ``stats``: the second value ``compute``
    returned (floats for logging), empty on a skip; ``reason``: why the step was skipped, or None;
    ``updated``: whether the role's weights changed (False on a skip, and inside a gradient-accumulation
    window before its last batch). The EMA reads it.
    """
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None
    updated: bool = False

    @property
    def skipped(self) -> bool:
        return self.reason is not None


class NonFiniteGuard(nn.Module):
    """Skip counters of the trainable roles and the guarded step.

    Args:
        roles: the trainable roles (one pair of counters each).
        max_consecutive: consecutive skips of one role after which training stops with
            ``RuntimeError`` (>= 1).
        owner: the model's name, for messages.
    """

    def __init__(self, roles: Sequence[str], max_consecutive: int = 10, owner: str = 'model'):
        super().__init__()
        if int(max_consecutive) != max_consecutive or max_consecutive < 1:
            raise ValueError(f'{owner}.max_consecutive_nonfinite must be an integer >= 1, '
                             f'got {max_consecutive!r}')
        self.roles = tuple(roles)
        self.max_consecutive = int(max_consecutive)
        self.owner = owner
        for role in self.roles:
            self.register_buffer(f'skips_{role}', torch.zeros((), dtype=torch.long))
            self.register_buffer(f'consecutive_{role}', torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f'roles={self.roles}, max_consecutive={self.max_consecutive}'

    # ------------------------------------------------------------------
    # counters
    # ------------------------------------------------------------------
    def skips(self, role: str) -> int:
        return int(self._counter('skips', role))

    def consecutive(self, role: str) -> int:
        return int(self._counter('consecutive', role))

    def _counter(self, kind: str, role: str) -> torch.Tensor:
        if role not in self.roles:
            raise KeyError(f'{self.owner}: unknown role {role!r}; roles are {self.roles}')
        return getattr(self, f'{kind}_{role}')

    def log_vars(self) -> Dict[str, torch.Tensor]:
        """``nonfinite_skips_<role>``: total skips per role (float tensors, for the logger)."""
        return {f'nonfinite_skips_{role}': self._counter('skips', role).detach().float()
                for role in self.roles}

    # ------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------
    def step(self, role: str, wrapper, module: nn.Module,
             compute: Callable[[], Tuple[Dict[str, torch.Tensor], Dict[str, float]]],
             data: Optional[Mapping] = None, iteration: Optional[int] = None,
             named_modules: Optional[Mapping[str, nn.Module]] = None) -> GuardedStep:
        """One guarded optimizer step of ``role``.

        Args:
            role: the role's name (counters, messages).
            wrapper: the role's ``OptimWrapper`` (or ``DeepSpeedRoleOptimWrapper``).
            module: given to ``wrapper.optim_context``.
            compute: returns ``(losses, stats)``: the loss terms (summed for backward) and floats to
                log. A :class:`NonFiniteError` it raises skips the step.
            data: the batch, to name its samples in messages.
            iteration: the model's iteration, for messages.
            named_modules: ``{prefix: module}`` to name parameters with non-finite gradients.
        """
        counter = self._counter('skips', role)  # validates the role
        reason = None
        updated = False
        losses: Dict[str, torch.Tensor] = {}
        stats: Dict[str, float] = {}
        with wrapper.optim_context(module):
            try:
                losses, stats = compute()
            except NonFiniteError as err:
                reason = f'{type(err).__name__}: {err}'
        device = _flag_device(losses, wrapper)
        if reason is None:
            loss = sum(losses.values())
            bad_terms = [k for k, v in losses.items() if not bool(torch.isfinite(v).all())]
            if bad_terms:
                reason = 'non-finite loss: ' + ', '.join(
                    f'{k}={float(losses[k].detach().float().sum()):g}' for k in bad_terms)
        if _any_rank(reason is not None, device) and reason is None:
            reason = 'non-finite loss on another rank'
        if reason is None:
            wrapper.backward(wrapper.scale_loss(loss))
            grad_reason = _check_gradients(wrapper, device, named_modules)
            if grad_reason is not None:
                # discard the gradients (and with accumulation, the window's) instead of stepping
                wrapper.zero_grad()
                reason = grad_reason + _back_off_loss_scale(wrapper)
            elif wrapper.should_update():
                wrapper.step()
                # DeepSpeed's wrapper steps its engine after every backward and knows the window's end;
                # mmengine's wrapper updates whenever should_update() holds
                updated = bool(getattr(wrapper, 'updated', True))
                wrapper.zero_grad()
        if reason is None:
            self._counter('consecutive', role).zero_()
            return GuardedStep({k: v.detach() for k, v in losses.items()}, dict(stats), None, updated)

        counter += 1
        consecutive = self._counter('consecutive', role)
        consecutive += 1
        # every rank skips together, so each rank's batch can be gathered to the logging rank
        described = _gather_descriptions(describe_batch(data))
        where = f'iteration {iteration}' if iteration is not None else 'this iteration'
        print_log(f'{self.owner}: skipped the {role} step at {where}: {reason}; batch: {described}; '
                  f'{role} skips: {int(counter)} in total, {int(consecutive)} in a row '
                  f'(limit max_consecutive_nonfinite={self.max_consecutive})',
                  logger='current', level=logging.WARNING)
        if int(consecutive) >= self.max_consecutive:
            raise RuntimeError(
                f'{self.owner}: the {role} step was skipped {int(consecutive)} times in a row '
                f'(max_consecutive_nonfinite={self.max_consecutive}) because of non-finite values; '
                f'last at {where}: {reason}; last batch: {described}. Check those samples, lower the '
                f'learning rate, or resume from an earlier checkpoint (docs/DESIGN.md §11).')
        finite = {k: v.detach() for k, v in losses.items() if bool(torch.isfinite(v).all())}
        return GuardedStep(finite, {}, reason)


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------
def describe_batch(data: Optional[Mapping]) -> str:
    """The batch's sample ids (``sample_id``, ``index``, keys ending in ``path``/``paths``) and the
    samples whose input tensors hold NaN/Inf, for skip messages."""
    if not data:
        return 'no batch given'
    parts = []
    for key in sorted(data):
        if key in _ID_KEYS or key.endswith('path') or key.endswith('paths'):
            parts.append(f'{key}={_listed(data[key])}')
    if not parts:
        parts.append(f'no sample ids (keys: {sorted(data)})')
    bad = _nonfinite_samples(data)
    if bad:
        ids = data.get('sample_id')
        named = []
        for key, rows in bad.items():
            if isinstance(ids, (list, tuple)) and len(ids) > max(rows):
                rows = [f'{i}:{ids[i]}' for i in rows]
            named.append(f'{key} of samples {rows}')
        parts.append('non-finite inputs: ' + '; '.join(named))
    return ', '.join(parts)


def _listed(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (list, tuple)):
        more = f' (+{len(value) - _MAX_LISTED} more)' if len(value) > _MAX_LISTED else ''
        return str(list(value[:_MAX_LISTED])) + more
    return repr(value)


def _nonfinite_samples(data: Mapping) -> Dict[str, List[int]]:
    """``{key: [batch rows]}`` of the floating-point batch tensors that hold NaN/Inf."""
    bad = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 1 \
                and value.numel():
            rows = (~torch.isfinite(value)).reshape(value.shape[0], -1).any(dim=1)
            if bool(rows.any()):
                bad[key] = rows.nonzero().flatten().tolist()
    return bad


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flag_device(losses: Mapping[str, torch.Tensor], wrapper) -> torch.device:
    """Where a rank flag can be all-reduced: the loss's device, else the parameters'."""
    for value in losses.values():
        if isinstance(value, torch.Tensor):
            return value.device
    for group in wrapper.optimizer.param_groups:
        for param in group['params']:
            return param.device
    return torch.device('cpu')


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on any rank (one all-reduce when several processes run)."""
    if _world_size() == 1:
        return flag
    if dist.get_backend() == 'nccl' and device.type != 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _gather_descriptions(described: str) -> str:
    """With several processes: every rank's batch description, rank by rank."""
    world = _world_size()
    if world == 1:
        return described
    gathered = [None] * world
    dist.all_gather_object(gathered, described)
    return ' | '.join(f'rank {rank}: {text}' for rank, text in enumerate(gathered))


def _check_gradients(wrapper, device: torch.device,
                     named_modules: Optional[Mapping[str, nn.Module]]) -> Optional[str]:
    """None when the role's gradients are finite, else the reason (naming the parameters)."""
    grads_finite = getattr(wrapper, 'grads_finite', None)
    if callable(grads_finite):
        # e.g. the DeepSpeed role wrapper: the gradients live in the engine's (ZeRO) buffers; it
        # answers for all ranks
        if grads_finite():
            return None
        return f'non-finite gradients ({type(wrapper).__name__}.grads_finite() is False)'
    bad = []
    checks = []
    for group in wrapper.optimizer.param_groups:
        for param in group['params']:
            if param.grad is not None:
                checks.append(torch.isfinite(param.grad).all())
    local_bad = bool(checks) and not bool(torch.stack(checks).all())  # one sync
    if not _any_rank(local_bad, device):
        return None
    if not local_bad:
        return 'non-finite gradients on another rank'
    names = {}
    for prefix, module in (named_modules or {}).items():
        names.update({id(p): f'{prefix}.{n}' for n, p in module.named_parameters()})
    for index, group in enumerate(wrapper.optimizer.param_groups):
        for param in group['params']:
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                bad.append(names.get(id(param), f"group {group.get('name', index)}"))
    more = f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''
    return f'non-finite gradients in {len(bad)} parameter tensor(s): {bad[:4]}{more}'


def _back_off_loss_scale(wrapper) -> str:
    """With dynamic loss scaling (mmengine ``AmpOptimWrapper``: a torch ``GradScaler``), an overflow
    must lower the scale, as ``GradScaler.step`` + ``update`` would have done on a skipped step;
    otherwise every later step overflows again. Returns a note for the message."""
    scaler = getattr(wrapper, 'loss_scaler', None)
    if scaler is None or not callable(getattr(scaler, 'is_enabled', None)) or not scaler.is_enabled():
        return ''
    new_scale = scaler.get_scale() * scaler.get_backoff_factor()
    scaler.update(new_scale)
    return f' (loss scale lowered to {new_scale:g})'
