"""Checkpoints and resume on mmengine's plain Runner (vdot_ext/engine/checkpointing.py):

* a run killed with SIGKILL after a checkpoint and resumed ends with the weights
  of the uninterrupted run, to the last bit (and does not without the RNG restore);
* a crafted checkpoint is refused by ``resume`` and ``load_from`` (and through
  ``tools/train.py --resume``) without running its code;
* a kill during a save, a truncated checkpoint or a ``last_checkpoint`` naming
  a deleted file never make the work dir unresumable.

Run as a script, this file is the training process the kill tests kill.
"""
import argparse
import itertools
import os
import os.path as osp
import signal
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner
from torch.utils.data import Dataset

from vdot_ext.engine.checkpointing import (
    VDOTCheckpointHook,
    checkpoint_problem,
    message_hub_from_plain,
    message_hub_to_plain,
    resolve_resume_checkpoint,
)
from vdot_ext.engine.compat import install_safe_checkpoint_loader, load_local_checkpoint
from vdot_ext.models.flow_matching_pretrainer import FlowMatchingPretrainer
from vdot_ext.registry import DATASETS, MODELS
from vdot_ext.utils import UnsafeCheckpointError, save_torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MARKER_ENV = 'VDOT_TEST_MARKER'


@DATASETS.register_module(name='ResumeTestLatents', force=True)
class ResumeTestLatents(Dataset):
    """Fixed random tensors shaped like a VCU sample (3 latent frames);
    ``noise`` > 0 adds fresh global-RNG noise per fetch (a random augmentation)."""

    def __init__(self, n=8, noise=0.0):
        self.noise = noise
        g = torch.Generator().manual_seed(0)
        self.items = [dict(context=torch.randn(6, 32, generator=g), negative_context=torch.randn(6, 32, generator=g),
                           latents=torch.randn(16, 3, 8, 8, generator=g),
                           vace_context=torch.randn(96, 3, 8, 8, generator=g)) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not self.noise:
            return self.items[i]
        return {k: v + self.noise * torch.randn_like(v) for k, v in self.items[i].items()}


class KillHook(Hook):
    """SIGKILL this process at iteration ``at`` (1-based): after its checkpoint
    is published (``where='after_save'``) or while it is being saved
    (``where='during_save'``, after the checkpoint dict is built)."""

    priority = 'LOWEST'

    def __init__(self, at, where='after_save'):
        self.at, self.where = at, where

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.where == 'after_save' and runner.iter + 1 == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_save_checkpoint(self, runner, checkpoint):
        if self.where == 'during_save' and checkpoint['meta']['iter'] == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class CrashHook(Hook):
    """Raise after iteration ``at`` (after its checkpoint): an in-process crash."""

    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            raise KeyboardInterrupt('simulated crash')


def pretrainer():
    return dict(type='FlowMatchingPretrainer', score=dict(type='WanVACEScore', preset='tiny-vace'))


def distiller():
    return dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'),
                discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3), bottleneck_dim=24,
                                   num_heads=2, use_time_emb=True),
                otd_loss=dict(type='OTDLoss', epsilon=0.1, num_iters=10, pool_kernel=2, normalize='none'),
                dmd_loss=dict(type='DMDLoss'), gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
                gen_every=2, guidance_scale=2.0, uncond='zeros', seed=3)


def optim_wrapper(model):
    adam = dict(optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0))
    roles = ('generator', 'critic') if model['type'] == 'VDOTDistiller' else ('score', )
    return dict(constructor='RoleOptimWrapperConstructor', **{role: dict(adam) for role in roles})


_RUNS = itertools.count()


def build(work_dir, max_iters, model=None, resume=False, load_from=None, interval=2, max_keep=1,
          checkpoint_type='VDOTCheckpointHook', extra_hooks=(), noise=0.0, visualizer=None,
          randomness=None, **checkpoint_args):
    """A plain Runner training ``model`` (default a tiny FlowMatchingPretrainer)."""
    model = model or pretrainer()
    dataset = dict(type='ResumeTestLatents', noise=noise)
    return Runner(
        model=model, work_dir=str(work_dir), experiment_name=f'run{os.getpid()}_{next(_RUNS)}',
        train_dataloader=dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate'), dataset=dataset),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=optim_wrapper(model),
        default_hooks=dict(checkpoint=dict(type=checkpoint_type, interval=interval, by_epoch=False,
                                           max_keep_ckpts=max_keep, **checkpoint_args),
                           logger=dict(type='LoggerHook', interval=100)),
        custom_hooks=list(extra_hooks), resume=resume, load_from=load_from, default_scope='vdot_ext',
        randomness=randomness or dict(seed=0), log_level='WARNING', log_processor=dict(by_epoch=False),
        visualizer=visualizer)


def weights(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f'{len(unequal)} tensors differ (max |Δ| = {max_diff(a, b):.3g}), e.g. {unequal[:3]}'


def train_in_subprocess(work_dir, max_iters, kill_at, where='after_save'):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, __file__, str(work_dir), str(max_iters), str(kill_at), where],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The reference: 4 iterations in one go."""
    runner = build(tmp_path_factory.mktemp('uninterrupted'), 4)
    runner.train()
    return weights(runner), runner.message_hub.get_scalar('train/loss_flow').data[0].copy()


def test_crash_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    reference, reference_losses = uninterrupted
    crashed = build(tmp_path, 4, extra_hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith('.pth')) == ['iter_2.pth']
    runner = build(tmp_path, 4, resume=True)
    runner.train()
    assert runner.iter == 4
    assert_identical(weights(runner), reference)
    # the message hub came back from plain tensors: its loss history spans the crash
    assert runner.message_hub.get_scalar('train/loss_flow').data[0].tolist() == reference_losses.tolist()


@pytest.mark.slow
def test_kill_9_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """The same with a real SIGKILL of a training process (this file as a script)."""
    reference, _ = uninterrupted
    train_in_subprocess(tmp_path, 4, kill_at=2)
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith('.pth')) == ['iter_2.pth']
    runner = build(tmp_path, 4, resume=True)
    runner.train()
    assert_identical(weights(runner), reference)


def test_without_the_rng_restore_resume_is_not_exact(tmp_path, uninterrupted):
    """The control: the test above has the power to see a missing RNG restore."""
    reference, _ = uninterrupted
    crashed = build(tmp_path, 4, extra_hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    runner = build(tmp_path, 4, resume=True, resume_rng=False)
    runner.train()
    assert max_diff(weights(runner), reference) > 1e-6


def test_rng_is_restored_after_the_fast_forward_through_trained_batches(tmp_path):
    """A dataset that draws from the global RNG while the resumed loop skips
    the batches already trained: the streams are restored after that skip,
    right before the first new batch, where the uninterrupted run stood."""
    reference = build(tmp_path / 'ref', 4, noise=0.1)
    reference.train()
    crashed = build(tmp_path / 'run', 4, noise=0.1, extra_hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = build(tmp_path / 'run', 4, noise=0.1, resume=True)
    resumed.train()
    assert_identical(weights(resumed), weights(reference))


@MODELS.register_module(name='PretrainerWithOwnGenerator', force=True)
class PretrainerWithOwnGenerator(FlowMatchingPretrainer):
    """Draws input noise from a generator it owns, and exposes its state
    through the rng_state()/set_rng_state() protocol."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.noise_generator = torch.Generator().manual_seed(7)

    def loss(self, data):
        latents = data['latents'] + 0.1 * torch.randn(data['latents'].shape, generator=self.noise_generator)
        return super().loss(dict(data, latents=latents))

    def rng_state(self):
        return dict(noise=self.noise_generator.get_state())

    def set_rng_state(self, state):
        self.noise_generator.set_state(state['noise'])


def test_a_generator_the_model_owns_is_restored(tmp_path):
    model = dict(pretrainer(), type='PretrainerWithOwnGenerator')
    reference = build(tmp_path / 'ref', 4, model=model)
    reference.train()
    crashed = build(tmp_path / 'run', 4, model=model, extra_hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = build(tmp_path / 'run', 4, model=model, resume=True)
    resumed.train()
    assert_identical(weights(resumed), weights(reference))


def test_distiller_crash_and_resume_is_exact(tmp_path):
    """VDOTDistiller: rollout noise, score timesteps, GAN/DM alternation."""
    reference = build(tmp_path / 'ref', 4, model=distiller())
    reference.train()
    crashed = build(tmp_path / 'run', 4, model=distiller(), extra_hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = build(tmp_path / 'run', 4, model=distiller(), resume=True)
    resumed.train()
    assert_identical(weights(resumed), weights(reference))


def test_checkpoints_hold_no_pickled_objects_and_rng_per_rank(tmp_path):
    runner = build(tmp_path, 2)
    runner.train()
    path = str(tmp_path / 'iter_2.pth')
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert not any('HistoryBuffer' in g or 'getattr' in g for g in found), found
    ckpt = load_local_checkpoint(path)
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss_flow'], HistoryBuffer)
    assert ckpt['rng_state']['world_size'] == 1 and len(ckpt['rng_state']['ranks']) == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith('.tmp')] == []
    assert open(tmp_path / 'last_checkpoint').read() == path


def test_message_hub_round_trip():
    buffer = HistoryBuffer([1.0, 2.5], [1, 3], max_length=7)
    state = dict(log_scalars={'train/loss': buffer}, runtime_info={'iter': 3}, resumed_keys={'train/loss': True})
    plain = message_hub_to_plain(state)
    assert isinstance(state['log_scalars']['train/loss'], HistoryBuffer)  # the input is not changed
    back = message_hub_from_plain(plain)['log_scalars']['train/loss']
    assert back.max_length == 7
    assert back.data[0].tolist() == [1.0, 2.5] and back.data[1].tolist() == [1, 3]
    assert back.mean() == buffer.mean()


# ---------------------------------------------------------------------------
# crafted checkpoints
# ---------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def _crafted(path, marker):
    torch.save({'meta': {'iter': 2, 'epoch': 0}, 'state_dict': {}, 'message_hub': _RunsCode(marker)}, path)


def test_crafted_checkpoint_is_refused_by_resume_and_load_from(tmp_path):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    _crafted(evil, marker)
    # load_from
    runner = build(tmp_path / 'load_from', 2, load_from=str(evil))
    with pytest.raises(UnsafeCheckpointError, match='evil.pth.*system'):
        runner.train()
    # resume=True from a work dir whose last checkpoint is the crafted file,
    # with our hook and with mmengine's own (the installed loader refuses)
    for hook in ('VDOTCheckpointHook', 'CheckpointHook'):
        work = tmp_path / f'resume_{hook}'
        work.mkdir()
        _crafted(work / 'iter_2.pth', marker)
        (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
        install_safe_checkpoint_loader()
        runner = build(work, 4, resume=True, checkpoint_type=hook)
        with pytest.raises(UnsafeCheckpointError, match='iter_2.pth.*system'):
            runner.train()
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_by_train_py_resume(tmp_path):
    from vdot_ext.tools.train import main
    marker = tmp_path / 'code_ran'
    work = tmp_path / 'work'
    work.mkdir()
    _crafted(work / 'iter_2.pth', marker)
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    config = tmp_path / 'cfg.py'
    config.write_text(
        "default_scope = 'vdot_ext'\n"
        f"model = {pretrainer()!r}\n"
        "train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler'),\n"
        "    collate_fn=dict(type='default_collate'), dataset=dict(type='ResumeTestLatents'))\n"
        "train_cfg = dict(type='IterBasedTrainLoop', max_iters=4)\n"
        f"optim_wrapper = {optim_wrapper(pretrainer())!r}\n"
        "default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))\n")
    # train.py reports it as an error message (SystemExit) naming the file
    with pytest.raises((UnsafeCheckpointError, SystemExit), match=r'refusing to load .*iter_2.pth.*system'):
        main([str(config), '--work-dir', str(work), '--resume'])
    assert not marker.exists()


# ---------------------------------------------------------------------------
# crashes during saves, damaged work dirs
# ---------------------------------------------------------------------------
class CrashDuringSave(Hook):
    """Raise inside the save of iteration ``at`` (its checkpoint dict built,
    nothing written yet): the state a kill during ``torch.save`` leaves,
    less the torn temporary file, which the test adds."""

    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def before_save_checkpoint(self, runner, checkpoint):
        if checkpoint['meta']['iter'] == self.at:
            raise KeyboardInterrupt('simulated kill during the save')


def test_crash_during_save_with_max_keep_1_leaves_a_resumable_work_dir(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    runner = build(tmp_path, 4, extra_hooks=[CrashDuringSave(4)])
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    # iteration 2's checkpoint, the only one kept, was not deleted before the
    # new one was complete, and last_checkpoint still names it
    assert open(tmp_path / 'last_checkpoint').read() == str(tmp_path / 'iter_2.pth')
    assert checkpoint_problem(str(tmp_path / 'iter_2.pth')) is None
    assert not (tmp_path / 'iter_4.pth').exists()
    # a partly written temporary (as a kill mid-write leaves) is ignored and removed
    (tmp_path / '.iter_4.pth.tmp').write_bytes(b'PK\x03\x04 torn')
    runner = build(tmp_path, 4, resume=True)
    runner.train()
    assert_identical(weights(runner), reference)
    assert sorted(p for p in os.listdir(tmp_path) if 'pth' in p) == ['iter_4.pth']


@pytest.mark.slow
def test_kill_9_during_save_leaves_a_resumable_work_dir(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    train_in_subprocess(tmp_path, 4, kill_at=4, where='during_save')
    assert open(tmp_path / 'last_checkpoint').read() == str(tmp_path / 'iter_2.pth')
    runner = build(tmp_path, 4, resume=True)
    runner.train()
    assert_identical(weights(runner), reference)


def _truncate(path):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


@pytest.fixture()
def damaged_work_dir(tmp_path):
    """The state mmengine's own hook leaves when killed during a save with
    max_keep_ckpts=1: the newest checkpoint truncated, last_checkpoint naming
    a deleted one. Here iteration 2's checkpoint survived (max_keep_ckpts=3)."""
    runner = build(tmp_path, 4, max_keep=3, extra_hooks=[CrashHook(4)])
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    _truncate(tmp_path / 'iter_4.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))  # deleted
    return tmp_path


def test_last_checkpoint_naming_a_deleted_file_falls_back_to_the_newest_good(damaged_work_dir, uninterrupted):
    reference, _ = uninterrupted
    with pytest.warns(UserWarning, match=r'falling back to .*iter_2.pth.*iter_6.pth.*does not exist.*'
                                         r'iter_4.pth.*(damaged|does not load)'):
        assert resolve_resume_checkpoint(str(damaged_work_dir)) == str(damaged_work_dir / 'iter_2.pth')
    runner = build(damaged_work_dir, 4, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        runner.train()
    assert_identical(weights(runner), reference)


def test_resolve_resume_checkpoint_cases(tmp_path):
    assert resolve_resume_checkpoint(str(tmp_path)) is None             # fresh work dir
    assert resolve_resume_checkpoint(str(tmp_path / 'new_dir')) is None
    with pytest.raises(ValueError, match='missing.pth.*does not exist'):
        resolve_resume_checkpoint(str(tmp_path / 'missing.pth'))
    save_torch({'meta': {'iter': 1}, 'w': torch.arange(1000.)}, str(tmp_path / 'iter_1.pth'))
    assert resolve_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_1.pth')  # no last_checkpoint
    assert resolve_resume_checkpoint(str(tmp_path / 'iter_1.pth')) == str(tmp_path / 'iter_1.pth')
    # a flipped byte inside the tensor data: torch.load would not notice, the CRC does
    data = bytearray(open(tmp_path / 'iter_1.pth', 'rb').read())
    with zipfile.ZipFile(tmp_path / 'iter_1.pth') as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith('/data/0'))
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    (tmp_path / 'iter_1.pth').write_bytes(bytes(data))
    assert 'CRC' in checkpoint_problem(str(tmp_path / 'iter_1.pth'))
    with pytest.raises(RuntimeError, match='no loadable checkpoint.*iter_1.pth.*CRC'):
        resolve_resume_checkpoint(str(tmp_path))
    # a DeepSpeed-strategy checkpoint directory
    ds = tmp_path / 'ds' / 'iter_3.pth'
    ds.mkdir(parents=True)
    assert 'vdot_state.pth' in checkpoint_problem(str(ds))
    save_torch({'meta': {'iter': 3}}, str(ds / 'vdot_state.pth'))
    assert resolve_resume_checkpoint(str(tmp_path / 'ds')) == str(ds)
    # a crafted file is an error, never skipped
    _crafted(tmp_path / 'ds' / 'iter_5.pth', tmp_path / 'marker')
    with pytest.raises(UnsafeCheckpointError):
        resolve_resume_checkpoint(str(tmp_path / 'ds'))
    assert not (tmp_path / 'marker').exists()


# ---------------------------------------------------------------------------
# several processes: each rank's streams come back to that rank
# ---------------------------------------------------------------------------
class RecordRNG(Hook):
    """The torch CPU RNG state when iteration ``at`` (0-based) starts."""

    def __init__(self, at, out):
        self.at, self.out = at, out

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == self.at:
            self.out.append(torch.get_rng_state())


def _two_rank_resume(rank, world, port, root):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        straight, resumed = [], []
        # seed + rank: every rank draws its own streams; only rank 0 writes checkpoints
        run = dict(randomness=dict(seed=0, diff_rank_seed=True))
        build(f'{root}/straight', 4, extra_hooks=[RecordRNG(2, straight)], **run).train()
        try:
            build(f'{root}/run', 4, extra_hooks=[CrashHook(2)], **run).train()
        except KeyboardInterrupt:
            pass
        dist.barrier()
        build(f'{root}/run', 4, resume=True, extra_hooks=[RecordRNG(2, resumed)], **run).train()
        torch.save(dict(straight=straight[0], resumed=resumed[0]), f'{root}/rng_rank{rank}.pt')
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_each_rank_resumes_its_own_rng_streams(tmp_path):
    import torch.multiprocessing as mp

    from vdot_ext.engine.deepspeed_strategy import free_port
    mp.start_processes(_two_rank_resume, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method='fork')
    got = [torch.load(tmp_path / f'rng_rank{r}.pt', weights_only=True) for r in range(2)]
    assert not torch.equal(got[0]['straight'], got[1]['straight'])    # the ranks' streams differ
    for rank in range(2):
        assert torch.equal(got[rank]['resumed'], got[rank]['straight']), rank
    ckpt = load_local_checkpoint(str(tmp_path / 'run' / 'iter_4.pth'))
    assert ckpt['rng_state']['world_size'] == 2


class _PutsAnObject(Hook):
    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint['not_allowed'] = VDOTCheckpointHook   # a class: unpickling it means importing code


def test_a_checkpoint_that_would_not_load_safely_is_never_published(tmp_path):
    runner = build(tmp_path, 2, extra_hooks=[_PutsAnObject()])
    with pytest.raises(RuntimeError, match='step 2 would not load safely'):
        runner.train()
    assert not (tmp_path / 'iter_2.pth').exists() and not (tmp_path / 'last_checkpoint').exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith('.tmp')] == []


def _main():
    parser = argparse.ArgumentParser()
    for name in ('work_dir', 'max_iters', 'kill_at', 'where'):
        parser.add_argument(name)
    args = parser.parse_args()
    torch.set_num_threads(1)   # as conftest.py: the same kernels as the reference run
    build(args.work_dir, int(args.max_iters), extra_hooks=[KillHook(int(args.kill_at), args.where)]).train()


if __name__ == '__main__':
    _main()
