"""Checkpoints that a crash cannot break, that load without running code, and
that resume exactly (docs/DESIGN.md §8, §11).

* :class:`VDOTCheckpointHook` (mmengine's ``CheckpointHook``, made crash-safe):
  each checkpoint is written under a temporary name, checked to load with
  ``weights_only=True``, fsynced and renamed; only then is ``last_checkpoint``
  rewritten (atomically), and only then are checkpoints beyond
  ``max_keep_ckpts`` deleted. A kill at any point leaves the previous
  checkpoint and a ``last_checkpoint`` naming a complete file.
* The message hub's ``HistoryBuffer`` objects pickle through
  ``builtins.getattr``, which a safe load must refuse; the hook stores them as
  plain tensors (:func:`message_hub_to_plain`) and the safe loader
  (``engine/compat.py``) turns them back (:func:`restore_plain_containers`).
* Exact resume: every checkpoint holds each rank's RNG streams (Python, numpy,
  torch CPU/CUDA, and a model's own generators through its optional
  ``rng_state()``/``set_rng_state()``); a resumed run restores them right before
  it fetches its first new batch, which is where the uninterrupted run stood
  when it wrote the checkpoint.
* :func:`resolve_resume_checkpoint`: the checkpoint a rerun should resume
  from: the file ``last_checkpoint`` names if it is complete and loads safely,
  else the newest one that does (with a warning).
"""
import glob
import os
import os.path as osp
import re
import shutil
import warnings
import zipfile
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from mmengine.dist import all_gather_object, broadcast_object_list, get_dist_info
from mmengine.hooks import CheckpointHook
from mmengine.logging import HistoryBuffer, print_log

from vdot_ext.registry import HOOKS
from vdot_ext.utils import (
    UnsafeCheckpointError,
    atomic_write,
    get_rng_state,
    is_main_process,
    safe_torch_load,
    set_rng_state,
    unwrap_model,
)

HISTORY_BUFFER_TAG = '__vdot_history_buffer__'
RNG_KEY = 'rng_state'
LAST_CHECKPOINT = 'last_checkpoint'
# a checkpoint directory of RoleDeepSpeedStrategy holds this file
DEEPSPEED_STATE = 'vdot_state.pth'
_CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
# what a killed save can leave behind: a checkpoint being written or moved
# aside, or atomic_write's temporary for last_checkpoint
_STALE_TEMPORARY = re.compile(r'^\.{1,2}((iter|epoch)_\d+\.pth(\.old|\.tmp)*|last_checkpoint\..*)\.tmp$')


# ---------------------------------------------------------------------------
# the message hub in plain containers
# ---------------------------------------------------------------------------
def _buffer_to_plain(buffer: HistoryBuffer) -> dict:
    log_history, count_history = buffer.data
    return {HISTORY_BUFFER_TAG: 1,
            'log_history': torch.as_tensor(log_history).clone(),
            'count_history': torch.as_tensor(count_history).clone(),
            'max_length': int(buffer.max_length)}


def _plain_to_buffer(plain: dict) -> HistoryBuffer:
    return HistoryBuffer(plain['log_history'].cpu().numpy(), plain['count_history'].cpu().numpy(),
                         int(plain['max_length']))


def _is_plain_buffer(value) -> bool:
    return isinstance(value, dict) and value.get(HISTORY_BUFFER_TAG) == 1


def message_hub_to_plain(state: dict) -> dict:
    """A copy of ``MessageHub.state_dict()`` whose ``HistoryBuffer`` values are
    plain dicts of tensors (loadable with ``weights_only=True``)."""
    out = dict(state)
    out['log_scalars'] = OrderedDict(
        (key, _buffer_to_plain(value) if isinstance(value, HistoryBuffer) else value)
        for key, value in state.get('log_scalars', {}).items())
    return out


def message_hub_from_plain(state: dict) -> dict:
    """Inverse of :func:`message_hub_to_plain` (values already ``HistoryBuffer``
    are kept), so ``MessageHub.load_state_dict`` gets what it expects."""
    out = dict(state)
    out['log_scalars'] = OrderedDict(
        (key, _plain_to_buffer(value) if _is_plain_buffer(value) else value)
        for key, value in state.get('log_scalars', {}).items())
    return out


def restore_plain_containers(checkpoint):
    """A safely loaded checkpoint as mmengine expects it (the message hub's
    buffers rebuilt); anything else is returned unchanged. Idempotent."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('message_hub'), dict):
        checkpoint['message_hub'] = message_hub_from_plain(checkpoint['message_hub'])
    return checkpoint


def read_checkpoint(path: str) -> dict:
    """Any checkpoint of ours as one dict, loaded safely onto the CPU: an
    mmengine ``.pth`` file, or a ``RoleDeepSpeedStrategy`` checkpoint folder
    (its ``vdot_state.pth`` with the tensor entries stored beside it)."""
    if osp.isdir(path):
        from .deepspeed_checkpoint import read_checkpoint_state
        return read_checkpoint_state(path)
    return restore_plain_containers(safe_torch_load(path, field='checkpoint'))


# ---------------------------------------------------------------------------
# validating and finding checkpoints
# ---------------------------------------------------------------------------
def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or None when it can.

    A file must be complete (its zip directory readable and every record's
    CRC right: a kill mid-write or a torn copy fails here) and load with
    ``weights_only=True`` (unpickled onto the meta device, so no tensor data is
    read into memory). A directory must be a ``RoleDeepSpeedStrategy``
    checkpoint whose ``vdot_state.pth`` passes the same test.
    :class:`UnsafeCheckpointError` (a file that needs arbitrary unpickling) is
    raised, not returned: such a file is never skipped silently.
    """
    if osp.isdir(path):
        state = osp.join(path, DEEPSPEED_STATE)
        if not osp.isfile(state):
            return f'directory without {DEEPSPEED_STATE} (not a complete DeepSpeed-strategy checkpoint)'
        return checkpoint_problem(state)
    if not osp.isfile(path):
        return 'file does not exist'
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f'damaged zip archive ({exc})'
        if bad is not None:
            return f'damaged record {bad!r} (CRC mismatch)'
    try:
        safe_torch_load(path, map_location='meta', field='resume checkpoint')
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated, corrupt, not a torch file
        return f'does not load ({exc})'
    return None


def _candidates(folder: str) -> List[str]:
    """``iter_*.pth`` (else ``epoch_*.pth``) checkpoints of ``folder``, newest first."""
    found = {'iter': [], 'epoch': []}
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            found[match.group(1)].append((int(match.group(2)), osp.join(folder, name)))
    group = found['iter'] or found['epoch']
    return [path for _, path in sorted(group, reverse=True)]


def _named_by_last_checkpoint(work_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(path named by ``last_checkpoint`` or None, the raw text)."""
    marker = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.isfile(marker):
        return None, None
    with open(marker) as f:
        named = f.read().strip()
    if not named:
        return None, named
    if not osp.isabs(named):
        named = osp.join(work_dir, named)
    if not osp.exists(named) and osp.exists(osp.join(work_dir, osp.basename(named))):
        named = osp.join(work_dir, osp.basename(named))  # the work dir was moved
    return named, named


def resolve_resume_checkpoint(work_dir_or_path: str) -> Optional[str]:
    """The checkpoint to resume from.

    * An explicit checkpoint (a ``.pth`` file, or a DeepSpeed-strategy
      checkpoint directory) is validated and returned; a damaged one is an
      error naming the file (no fallback for a path the user chose).
    * A work dir: the checkpoint ``last_checkpoint`` names when it passes
      :func:`checkpoint_problem`; otherwise, with a warning, the newest
      ``iter_*.pth``/``epoch_*.pth`` that does. ``None`` when the work dir
      holds no checkpoint at all (a fresh run); ``RuntimeError`` listing each
      file and its problem when it holds checkpoints but none is usable.

    A checkpoint that would need arbitrary unpickling raises
    :class:`UnsafeCheckpointError` (``VDOT_EXT_TRUST_PICKLE=1`` for files you trust).
    """
    path = os.fspath(work_dir_or_path)
    explicit = osp.isfile(path) or osp.isfile(osp.join(path, DEEPSPEED_STATE)) \
        or path.endswith(('.pth', '.pt', '.ckpt'))
    if explicit:
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f'resume checkpoint {path}: {problem}')
        return path
    if not osp.isdir(path):
        return None
    named, raw = _named_by_last_checkpoint(path)
    problems = []
    if named is not None:
        problem = checkpoint_problem(named)
        if problem is None:
            return named
        problems.append(f'{named} (named by {LAST_CHECKPOINT}): {problem}')
    elif raw is not None:
        problems.append(f'{osp.join(path, LAST_CHECKPOINT)} is empty')
    for candidate in _candidates(path):
        if candidate == named:
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            if problems:
                message = (f'resume: falling back to {candidate}, the newest loadable checkpoint in {path}; '
                           f'skipped: {"; ".join(problems)}')
                warnings.warn(message, stacklevel=2)
                print_log(message, logger='current', level=30)
            return candidate
        problems.append(f'{candidate}: {problem}')
    if problems:
        raise RuntimeError(f'resume: no loadable checkpoint in {path}: {"; ".join(problems)}. Delete the '
                           f'damaged files (and {LAST_CHECKPOINT}) to start this run from scratch, or '
                           'use another work dir.')
    return None


# ---------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------
def rank_rng_state(model=None) -> dict:
    """This rank's RNG streams, plus the generators ``model`` owns when it
    exposes ``rng_state()``."""
    state = dict(streams=get_rng_state())
    model = unwrap_model(model) if model is not None else None
    if model is not None and callable(getattr(model, 'rng_state', None)):
        state['model'] = model.rng_state()
    return state


def set_rank_rng_state(state: dict, model=None) -> None:
    """Restore :func:`rank_rng_state`."""
    set_rng_state(state['streams'])
    model = unwrap_model(model) if model is not None else None
    if 'model' in state:
        if model is None or not callable(getattr(model, 'set_rng_state', None)):
            raise ValueError(f'checkpoint {RNG_KEY}: holds the RNG state of a model generator but '
                             f'{type(model).__name__} has no set_rng_state()')
        model.set_rng_state(state['model'])


def _resolve_on_rank_0(work_dir: str) -> Optional[str]:
    """:func:`resolve_resume_checkpoint` run once (rank 0), its answer or its
    error shared with every rank."""
    answer = [None]
    if is_main_process():
        try:
            answer = [('ok', resolve_resume_checkpoint(work_dir))]
        except Exception as exc:  # every rank must raise, not wait for rank 0
            answer = [('error', exc)]
    broadcast_object_list(answer)
    status, value = answer[0]
    if status == 'error':
        raise value
    return value


class _RestoreBeforeFirstFetch:
    """Wraps ``IterBasedTrainLoop.dataloader_iterator``: lets the loop's own
    fast-forward (``skip`` batches already trained) through, then calls
    ``restore`` just before the first new batch is fetched, and unwraps itself."""

    def __init__(self, loop, skip: int, restore: Callable[[], None]):
        self.loop, self.inner, self.skip, self.restore = loop, loop.dataloader_iterator, skip, restore

    def __iter__(self):
        return self

    def __next__(self):
        if self.skip > 0:
            self.skip -= 1
            return next(self.inner)
        self.restore()
        self.loop.dataloader_iterator = self.inner
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------
# the hook
# ---------------------------------------------------------------------------
@HOOKS.register_module()
class VDOTCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with crash-safe saving, safe loading and
    exact resume (module docstring). Arguments are ``CheckpointHook``'s, plus:

    Args:
        resume_rng: restore each rank's RNG streams on resume (default). A
            resume with a different number of processes warns and keeps the
            seeded streams.
        verify_saved: before a checkpoint is published, check that it loads
            with ``weights_only=True``, so that a value no safe load accepts
            fails the save that adds it, not a resume days later.

    On the plain ``Runner`` with ``resume=True`` and no ``load_from``, the hook
    also chooses the checkpoint (:func:`resolve_resume_checkpoint`) instead of
    trusting ``last_checkpoint`` blindly, and installs the safe loader.
    """

    def __init__(self, *args, resume_rng: bool = True, verify_saved: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_rng = bool(resume_rng)
        self.verify_saved = bool(verify_saved)
        self._rank_states: Optional[list] = None
        self._loaded_rng: Optional[dict] = None
        self._loaded_iter: Optional[int] = None

    # -- loading ------------------------------------------------------------
    def before_run(self, runner) -> None:
        from .compat import install_safe_checkpoint_loader
        install_safe_checkpoint_loader()
        # the plain Runner resumes after before_run (FlexibleRunner before it:
        # there the entry point calls resolve_resume_checkpoint itself)
        if getattr(runner, '_resume', False) is True and getattr(runner, '_load_from', 0) is None \
                and not getattr(runner, '_has_loaded', False):
            chosen = _resolve_on_rank_0(runner.work_dir)
            if chosen is not None:
                runner._load_from = chosen

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        restore_plain_containers(checkpoint)
        self._loaded_rng = checkpoint.get(RNG_KEY)
        self._loaded_iter = (checkpoint.get('meta') or {}).get('iter')

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and self._is_local():
            self._remove_stale_temporaries(runner.work_dir)
        resumed = runner.iter > 0 and self._loaded_iter == runner.iter
        if not (resumed and self.resume_rng):
            return
        if self._loaded_rng is None:
            runner.logger.warning(f'resume: the checkpoint of iteration {runner.iter} holds no RNG state '
                                  '(written without VDOTCheckpointHook); the random streams restart from the '
                                  'seed and the run will not repeat the uninterrupted one exactly')
            return
        rank, world = get_dist_info()
        saved_world = int(self._loaded_rng.get('world_size', 0))
        if saved_world != world:
            runner.logger.warning(f'resume: the checkpoint was written by {saved_world} processes, this run has '
                                  f'{world}; the RNG streams restart from the seed')
            return
        state = self._loaded_rng['ranks'][rank]

        def restore():
            set_rank_rng_state(state, runner.model)

        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):
            # IterBasedTrainLoop fast-forwards `iter` batches after
            # before_train_epoch; restore right before the first new batch
            loop.dataloader_iterator = _RestoreBeforeFirstFetch(loop, runner.iter, restore)
        else:   # epoch-based: the next epoch builds its data iterator from here
            restore()

    # -- saving -------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if isinstance(checkpoint.get('message_hub'), dict):
            checkpoint['message_hub'] = message_hub_to_plain(checkpoint['message_hub'])
        states = self._rank_states or [rank_rng_state(runner.model)]
        checkpoint[RNG_KEY] = dict(world_size=len(states), ranks=states)

    def _is_local(self) -> bool:
        from mmengine.fileio.backends import LocalBackend
        return isinstance(getattr(self, 'file_backend', None), LocalBackend) and \
            getattr(self, 'file_client_args', None) is None

    def _remove_stale_temporaries(self, runner_work_dir: str) -> None:
        for folder in {self.out_dir, runner_work_dir}:
            for path in glob.glob(osp.join(folder, '.*.tmp')):
                if _STALE_TEMPORARY.match(osp.basename(path)):
                    _remove(path)

    def _save_checkpoint_with_step(self, runner, step, meta):
        # every rank's RNG state, gathered before the (rank-0) save
        self._rank_states = all_gather_object(rank_rng_state(runner.model))
        try:
            if not self._is_local():
                runner.logger.warning('VDOTCheckpointHook: out_dir is not a local directory; saving with '
                                      "mmengine's non-atomic CheckpointHook logic")
                return super()._save_checkpoint_with_step(runner, step, meta)
            return self._save_atomically(runner, step, meta)
        finally:
            self._rank_states = None

    def _save_atomically(self, runner, step, meta):
        expired = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                expired.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        final = osp.join(self.out_dir, filename)
        temporary = osp.join(self.out_dir, f'.{filename}.tmp')
        self.last_ckpt = final
        runner.message_hub.update_info('last_ckpt', final)
        runner.save_checkpoint(self.out_dir, osp.basename(temporary), self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        if self.verify_saved:
            written = osp.join(temporary, DEEPSPEED_STATE) if osp.isdir(temporary) else temporary
            try:
                safe_torch_load(written, map_location='meta', field='saved checkpoint')
            except Exception as exc:
                _remove(temporary)
                raise RuntimeError(f'VDOTCheckpointHook: the checkpoint for step {step} would not load safely '
                                   f'and was not published ({exc})') from exc
        _fsync_tree(temporary)
        _publish(temporary, final)
        with atomic_write(osp.join(runner.work_dir, LAST_CHECKPOINT), 'w') as f:
            f.write(final)
        for old in expired:
            _remove(osp.join(self.out_dir, self.filename_tmpl.format(old)))


def _remove(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path)
    elif osp.lexists(path):
        os.remove(path)


def _fsync_tree(path: str) -> None:
    """Flush ``path`` (a file, or every file of a directory) to disk."""
    files = [path] if osp.isfile(path) else [osp.join(root, name) for root, _, names in os.walk(path)
                                              for name in names]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temporary: str, final: str) -> None:
    """Rename ``temporary`` to ``final`` (a file atomically; a directory, which
    ``os.replace`` cannot put over a non-empty one, after moving the old aside)."""
    if osp.isdir(temporary) and osp.isdir(final):
        aside = osp.join(osp.dirname(final), f'.{osp.basename(final)}.old.tmp')
        _remove(aside)
        os.replace(final, aside)
        os.replace(temporary, final)
        shutil.rmtree(aside)
    else:
        os.replace(temporary, final)
    _fsync_dir(osp.dirname(osp.abspath(final)))
