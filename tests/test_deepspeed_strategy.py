"""RoleDeepSpeedStrategy on CPU (gloo, DeepSpeed's CPU accelerator), through
the ``mim train`` entry point (vdot_ext/tools/train.py): one and two
processes at ZeRO-2 and ZeRO-3, weights identical on all ranks, kill-free
resume equal to an uninterrupted run, the plain Runner path unchanged.

Each launch runs several training jobs in one process (tests/_deepspeed_worker.py)
to keep the import/start-up cost (~15 s per process on 2 cores) down. The first
DeepSpeed use on a clean machine JIT-compiles a small CPU op (about a minute).
"""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from vdot_ext.engine.deepspeed_strategy import free_port

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
sys.path.insert(0, HERE)
from _deepspeed_worker import tiny_config  # noqa: E402

TRAINABLE = ('generator.', 'fake_score.', 'discriminator.')



def launch(jobs, tmp_path, nproc=1, timeout=420):
    """Run ``train.py`` jobs (lists of argv) in 1 process (launcher none) or
    ``nproc`` torchrun processes (launcher pytorch)."""
    jobs_file = tmp_path / f'jobs_{nproc}.json'
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    worker = osp.join(HERE, '_deepspeed_worker.py')
    if nproc == 1:
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            env.pop(key, None)
        cmd = [sys.executable, worker, str(jobs_file)]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               f'--master_port={free_port()}', worker, str(jobs_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n'
                             f'{proc.stderr[-8000:]}')
    return proc


def job(cfg, work_dir, name, launcher, max_iters=None, resume=False):
    argv = [str(cfg), '--work-dir', str(work_dir), '--launcher', launcher,
            '--cfg-options', f'experiment_name={name}']
    if max_iters is not None:
        argv.append(f'train_cfg.max_iters={max_iters}')
    if resume:
        argv.append('--resume')
    return argv


def load(work_dir, rank=0):
    return torch.load(osp.join(work_dir, f'final_rank{rank}.pt'), weights_only=True)


def assert_same(a, b, atol=0.0, keys=None):
    keys = keys or a.keys()
    assert set(a) == set(b)
    for k in keys:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol,
                                   msg=lambda m, k=k: f'{k}: {m}')


def changed_keys(a, b):
    return [k for k in a if k.startswith(TRAINABLE) and not torch.equal(a[k], b[k])]


def resume_scenario(tmp_path, zero, nproc, launcher):
    """8 iterations straight vs 4 + (save, new process state) resume to 8,
    plus a 4-iteration ZeRO-(other) run; returns the work dirs."""
    cfg = tiny_config(tmp_path / f'tiny_z{zero}.py', zero_stage=zero, max_iters=8,
                      checkpoint_interval=4)
    straight, resumed = tmp_path / f'z{zero}_straight', tmp_path / f'z{zero}_resumed'
    return cfg, straight, resumed, [
        job(cfg, straight, f'z{zero}_straight', launcher, 8),
        job(cfg, resumed, f'z{zero}_first4', launcher, 4),
        job(cfg, resumed, f'z{zero}_resume8', launcher, 8, resume=True),
    ]


def check_resume(straight, resumed, nproc, zero):
    for rank in range(nproc):
        a, b = load(straight, rank), load(resumed, rank)
        assert a['iteration'] == b['iteration'] == 8
        # Algorithm-1 schedule continued from the saved iteration counter
        assert b['exit_steps'] == a['exit_steps'][4:]
        assert_same(a['state_dict'], b['state_dict'], atol=1e-6)
    ckpt = osp.join(resumed, 'iter_4.pth')
    for role in ('generator', 'critic'):
        shards = glob.glob(osp.join(ckpt, role, '*optim_states.pt'))
        # ZeRO-2/3: one optimizer shard per rank
        assert len(shards) == nproc, (role, shards)
    assert sorted(glob.glob(osp.join(ckpt, 'rng_state_rank*.pth'))) == [
        osp.join(ckpt, f'rng_state_rank{r}.pth') for r in range(nproc)]
    # published whole: no staging folder left behind
    assert not glob.glob(osp.join(resumed, '.*.tmp'))


def check_ranks_agree(work_dir, nproc, init=None):
    first = load(work_dir, 0)
    for rank in range(1, nproc):
        other = load(work_dir, rank)
        # data-parallel roles: identical weights and exit steps on every rank
        assert_same(first['state_dict'], other['state_dict'])
        assert first['exit_steps'] == other['exit_steps']
    assert first['world_size'] == nproc
    return first


@pytest.mark.timeout(600)
def test_one_process_zero2_resume_and_zero3(tmp_path):
    cfg2, straight, resumed, jobs = resume_scenario(tmp_path, 2, 1, 'none')
    cfg3 = tiny_config(tmp_path / 'tiny_z3.py', zero_stage=3, max_iters=8, checkpoint_interval=4)
    jobs.append(job(cfg3, tmp_path / 'z3_one', 'z3_one', 'none'))
    launch(jobs, tmp_path, nproc=1)
    check_resume(straight, resumed, 1, 2)
    # training moved every trainable role and the second half moved them again
    from vdot_ext.engine.deepspeed_checkpoint import read_checkpoint_state
    four = read_checkpoint_state(osp.join(resumed, 'iter_4.pth'))   # weights_only loads only
    assert four['meta']['iter'] == 4
    a = load(straight)['state_dict']
    z3 = load(tmp_path / 'z3_one')
    assert z3['iteration'] == 8
    # ZeRO-3 (partitioned, gathered per module) trains like ZeRO-2: same
    # updates up to float32 reduction order (a stale ZeRO-3 gradient of a role
    # part without gradients in a step would show here)
    assert_same(a, z3['state_dict'], atol=1e-4)
    assert four['state_dict']['iteration'] == 4
    # the model's loose state is a safetensors file, not a pickle
    assert osp.isfile(osp.join(resumed, 'iter_4.pth', 'state_dict.safetensors'))
    assert {k.split('.')[0] for k in changed_keys(a, load(resumed)['state_dict'])} <= {
        'generator', 'fake_score', 'discriminator'}
    # ZeRO-3 saves partitioned parameters: one shard file per rank
    assert glob.glob(osp.join(tmp_path / 'z3_one', 'iter_4.pth', 'generator',
                              'zero_pp_rank_0_mp_rank_00_optim_states.pt'))


@pytest.mark.timeout(600)
def test_two_processes_zero3_resume_and_zero2(tmp_path):
    cfg3, straight, resumed, jobs = resume_scenario(tmp_path, 3, 2, 'pytorch')
    cfg2 = tiny_config(tmp_path / 'tiny_z2.py', zero_stage=2, max_iters=4)
    jobs.append(job(cfg2, tmp_path / 'z2_two', 'z2_two', 'pytorch'))
    launch(jobs, tmp_path, nproc=2)
    check_resume(straight, resumed, 2, 3)
    final3 = check_ranks_agree(straight, 2)
    final2 = check_ranks_agree(tmp_path / 'z2_two', 2)
    assert final3['iteration'] == 8 and final2['iteration'] == 4
    # ranks drew different noise (diff_rank_seed), yet weights agree: the
    # gradients were all-reduced; and both runs trained all roles
    assert {k.split('.')[0] for k in changed_keys(final3['state_dict'], final2['state_dict'])} \
        == {'generator', 'fake_score', 'discriminator'}


def test_plain_runner_path_unchanged(tmp_path):
    """Without ``strategy`` the same config trains on mmengine's Runner."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from vdot_ext.engine.deepspeed_strategy import build_runner
    cfg = tiny_config(tmp_path / 'plain.py', max_iters=2, strategy=False, checkpoint_interval=2)
    cfg = Config.fromfile(str(cfg))
    cfg.work_dir = str(tmp_path / 'plain')
    cfg.launcher = 'none'
    runner = build_runner(cfg)
    assert type(runner) is Runner
    runner.train()
    assert int(runner.model.iteration) == 2
    assert osp.isfile(osp.join(cfg.work_dir, 'iter_2.pth'))
    out = load(cfg.work_dir)
    assert out['iteration'] == 2


def test_role_config_maps_optim_wrapper_fields():
    """clip_grad/accumulative_counts of a role's optim_wrapper become that
    engine's gradient_clipping/gradient_accumulation_steps; per-role
    overrides win; no network, no process group needed."""
    from mmengine.optim import OptimWrapper

    from vdot_ext.engine.deepspeed_strategy import RoleDeepSpeedStrategy
    strategy = RoleDeepSpeedStrategy.__new__(RoleDeepSpeedStrategy)
    strategy.config = dict(zero_optimization=dict(stage=3), bf16=dict(enabled=True))
    strategy.role_overrides = dict(critic=dict(gradient_clipping=0.5))
    strategy.frozen_config = {}
    strategy.dispatch_kwargs = dict(train_micro_batch_size_per_gpu=2)
    p = torch.nn.Parameter(torch.zeros(2))
    wrapper = OptimWrapper(torch.optim.AdamW([p]), accumulative_counts=3,
                           clip_grad=dict(max_norm=10.0))
    gen = strategy.role_config('generator', wrapper)
    assert gen['gradient_clipping'] == 10.0 and gen['gradient_accumulation_steps'] == 3
    assert gen['train_micro_batch_size_per_gpu'] == 2
    assert gen['zero_optimization']['stage'] == 3 and gen['bf16']['enabled']
    critic = strategy.role_config('critic', wrapper)
    assert critic['gradient_clipping'] == 0.5
    frozen = strategy.frozen_role_config()
    assert 'gradient_clipping' not in frozen and frozen['zero_optimization']['stage'] == 3
    # a DeepSpeed dict that contradicts the wrapper's accumulation is refused, not silently preferred
    strategy.config['gradient_accumulation_steps'] = 1
    with pytest.raises(ValueError, match=r"optim_wrapper\.generator\.accumulative_counts=3 but the DeepSpeed "
                                         r"config sets gradient_accumulation_steps=1"):
        strategy.role_config('generator', wrapper)
    assert strategy.role_config('generator', OptimWrapper(torch.optim.AdamW([p])))['gradient_accumulation_steps'] == 1
    del strategy.config['gradient_accumulation_steps']
    with pytest.raises(ValueError, match='max_norm'):
        strategy.role_config('generator', OptimWrapper(torch.optim.AdamW([p]),
                                                       clip_grad=dict(type='value', clip_value=1)))
    strategy.config['bf16']['check_grad_overflow'] = False
    with pytest.raises(ValueError, match='check_grad_overflow'):
        strategy.role_config('generator', wrapper)
