"""One role's optimizer wrapper over a DeepSpeed engine (docs/DESIGN.md §7, §11).

The model's ``train_step`` drives every role the same way on the plain Runner
and under ``RoleDeepSpeedStrategy``: ``update_params(loss)``, or the guarded
step (``vdot_ext/models/guarded_step.py``)::

    with wrapper.optim_context(module): loss = ...
    wrapper.backward(wrapper.scale_loss(loss))
    if wrapper.grads_finite(): wrapper.step(); wrapper.zero_grad()
    else:                      wrapper.zero_grad()          # skip

Here ``backward`` is ``engine.backward`` (loss scaling, 1/GAS averaging, ZeRO
gradient reduction and partitioning), ``step`` is ``engine.step`` (optimizer
step at a gradient-accumulation boundary: clipping, update, zeroing), and a
skip goes through DeepSpeed's own overflow path, so its counters stay
consistent (module docstring of :class:`DeepSpeedRoleOptimWrapper`).
"""
import logging
from contextlib import contextmanager
from typing import Iterator, List

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper


class DeepSpeedRoleOptimWrapper(OptimWrapper):
    """One role's optimizer wrapper over a DeepSpeed engine (ZeRO 1-3).

    * ``backward(loss)``: ``engine.backward``; ``scale_loss`` is the identity and
      ``should_update`` always true, because DeepSpeed itself divides by the
      gradient-accumulation steps (GAS) and steps only at a window's boundary.
    * ``step()``: ``engine.step()``; records ``train/<role>_grad_norm``.
    * ``zero_grad()`` right after ``step()``: nothing (DeepSpeed zeroes after
      its step). ``zero_grad()`` after a ``backward`` without ``step`` is a
      *skip*: the accumulation window is discarded (its gradients are summed
      in the same buffers as the bad one). At the window's boundary the
      wrapper fills this rank's gradient partitions with NaN and calls
      ``engine.step()``: DeepSpeed's overflow check (all-reduced over ranks)
      then skips the update and clears the gradients, and the engine's micro
      and global step counters, the loss scale (fp16) and the ZeRO
      bookkeeping advance as after any overflow step. Before the boundary the
      window is marked bad, the engine's micro step advances, and the boundary
      is skipped the same way. The wrapper checks that DeepSpeed did skip.
    * ``grads_finite()``: whether this window's gradients are finite on every
      rank: this rank's gradient partitions (ZeRO-3: the flat partition
      buffer; ZeRO-1/2: the reduced partitions and accumulators; unreduced
      ``param.grad``), one all-reduce, the same answer on all ranks.

    ``optimizer`` is the torch optimizer DeepSpeed steps (its ``param_groups``
    carry the learning rates mmengine's schedulers and loggers read and write).
    """

    def __init__(self, engine, optimizer: torch.optim.Optimizer, role: str):
        zero = engine.optimizer
        if getattr(zero, 'cpu_offload', False) or getattr(zero, 'offload_optimizer', False):
            # the gradients then live in CPU buffers this wrapper does not check or skip
            raise NotImplementedError(f'DeepSpeedRoleOptimWrapper({role}): optimizer offload is not supported '
                                      '(the non-finite check and skip read the on-device gradient partitions)')
        super().__init__(optimizer)
        self.engine = engine
        self.role = role
        self._backward_pending = False   # a backward not yet followed by step()/zero_grad()
        self._window_bad = False         # the current accumulation window is to be skipped
        self.updated = False             # the last step() changed the weights (a window's end, not skipped)

    # -- the model's interface --------------------------------------------
    @contextmanager
    def optim_context(self, model: nn.Module):
        # DeepSpeed's own forward clears the ZeRO backward bookkeeping at the
        # start of each micro step; the model calls its modules directly.
        engine = self.engine
        opt = engine.optimizer
        if hasattr(opt, 'clear_backward_seen_flag'):
            opt.clear_backward_seen_flag()
        buffer = getattr(opt, 'grad_partitions_flat_buffer', None)
        if buffer is not None and self._window_starts():
            # ZeRO-3 keeps reduced gradients in one flat buffer and, for a
            # parameter that requires grad but gets none in this backward
            # (the discriminator during a fake-score step), re-uses the stale
            # slice of the previous window. Zero it when a window starts.
            buffer.zero_()
        yield

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss   # engine.backward divides by GAS

    def should_update(self) -> bool:
        return True   # engine.step() knows the accumulation boundary

    def update_params(self, loss: torch.Tensor, step_kwargs=None, zero_kwargs=None) -> None:
        self.backward(loss)
        self.step()

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        from deepspeed.runtime.utils import register_output_backward_hooks
        if self._backward_pending:
            raise RuntimeError(f'DeepSpeedRoleOptimWrapper({self.role}): backward() twice without step() or '
                               'zero_grad() in between; DeepSpeed needs one of them after each backward')
        engine = self.engine
        # engine.forward() registers the backward prologue (ZeRO bookkeeping,
        # accumulation boundary) on its outputs; the model computed the loss
        # from direct module calls, so it is registered on the loss, which is
        # the first tensor the backward pass reaches.
        register_output_backward_hooks(
            loss, preprocess_once_fn=engine._backward_prologue,
            preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)
        engine.backward(loss)
        self._backward_pending = True
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        if not self._backward_pending:
            raise RuntimeError(f'DeepSpeedRoleOptimWrapper({self.role}): step() without a backward() first')
        self.updated = False
        if self._window_bad:
            self._skip()
            return
        engine = self.engine
        skipped, boundary = engine.skipped_steps, engine.is_gradient_accumulation_boundary()
        engine.step()
        self._backward_pending = False
        self.updated = boundary and engine.skipped_steps == skipped
        if engine.skipped_steps != skipped:
            # DeepSpeed's own overflow check found non-finite gradients
            print_log(f'DeepSpeed skipped the {self.role} step at global step {engine.global_steps} '
                      '(non-finite gradients)', logger='current', level=logging.WARNING)
            return
        if boundary and self.message_hub is not None:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.message_hub.update_scalar(f'train/{self.role}_grad_norm', float(norm))

    def zero_grad(self, **kwargs) -> None:
        # after step(): DeepSpeed has zeroed the gradients itself
        if self._backward_pending:
            self._skip()

    def grads_finite(self) -> bool:
        """True when every rank's gradients of the current accumulation window
        are finite (call after ``backward``; all ranks must call it)."""
        local_bad = torch.zeros((), dtype=torch.bool)
        if self._window_bad:
            local_bad = torch.ones((), dtype=torch.bool)
        else:
            for grad in self._local_gradients():
                local_bad = local_bad | ~torch.isfinite(grad).all().cpu()
        return not _any_rank(bool(local_bad), self.engine)

    def initialize_count_status(self, model, init_counts, max_counts) -> None:
        self._inner_count = init_counts
        self._max_counts = max_counts

    # optimizer state lives in the engine's checkpoint
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    # -- internals ----------------------------------------------------------
    def _window_starts(self) -> bool:
        engine = self.engine
        return engine.micro_steps % engine.gradient_accumulation_steps() == 0

    def _skip(self) -> None:
        """Discard the current accumulation window through DeepSpeed's overflow path."""
        engine = self.engine
        self._window_bad = True
        self._backward_pending = False
        if not engine.is_gradient_accumulation_boundary():
            engine.step()   # advances the micro step only; the boundary will skip
            return
        poisoned = 0
        for grad in self._local_gradients(boundary=True):
            grad.fill_(float('nan'))
            poisoned += grad.numel()
        skipped = engine.skipped_steps
        engine.step()
        self._window_bad = False
        if engine.skipped_steps != skipped + 1:
            raise RuntimeError(
                f'DeepSpeedRoleOptimWrapper({self.role}): DeepSpeed applied a step that was to be skipped '
                f'({poisoned} gradient values set to NaN on this rank; '
                f'{type(engine.optimizer).__name__} did not report an overflow)')

    def _local_gradients(self, boundary: bool = False) -> Iterator[torch.Tensor]:
        """The tensors that hold this rank's gradients of the current window.

        ZeRO-3: the flat buffer of this rank's gradient partitions. ZeRO-1/2:
        the reduced partitions of the window (``averaged_gradients``, filled
        at the boundary), the accumulators of earlier micro steps
        (``all_grad_tensors``) and gradients not reduced yet (``param.grad``).
        With ``boundary=True`` only what DeepSpeed's step reads."""
        opt = self.engine.optimizer
        flat = getattr(opt, 'grad_partitions_flat_buffer', None)
        if flat is not None:   # ZeRO-3
            yield flat
            return
        if not hasattr(opt, 'averaged_gradients'):
            raise NotImplementedError(
                f'DeepSpeedRoleOptimWrapper({self.role}): {type(opt).__name__} (ZeRO stage '
                f'{self.engine.zero_optimization_stage()}) is not supported; use ZeRO stage 1, 2 or 3')
        stores = [opt.averaged_gradients]
        if not boundary:
            stores.append(getattr(opt, 'all_grad_tensors', {}))
        for store in stores:
            for value in (store or {}).values():
                for grad in (value if isinstance(value, (list, tuple)) else [value]):
                    if isinstance(grad, torch.Tensor) and grad.numel():
                        yield grad
        if not boundary:
            for group in getattr(opt, 'bit16_groups', []):
                for param in group:
                    for grad in (param.grad, getattr(param, 'grad_accum', None)):
                        if isinstance(grad, torch.Tensor):
                            yield grad


def _any_rank(flag: bool, engine) -> bool:
    """True when ``flag`` holds on any rank (one all-reduce on the accelerator)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return flag
    from deepspeed.accelerator import get_accelerator
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=get_accelerator().current_device_name())
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())
