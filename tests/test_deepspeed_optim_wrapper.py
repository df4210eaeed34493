"""DeepSpeedRoleOptimWrapper under ZeRO-2 and ZeRO-3 (CPU, gloo), driven the
way the models' guarded step drives it (tests/_ds_wrapper_worker.py):

* a NaN batch: ``grads_finite()`` is False on every rank, the skip leaves all
  weights unchanged, and the run goes on exactly as if the batch had not been
  there (equal to a reference run without it: no optimizer state advanced);
* a skip with finite gradients (the guard's decision) changes nothing either;
* gradient accumulation 2: a NaN micro-batch discards its whole window and
  the next window is exact;
* ``update_params`` without the guard: DeepSpeed's overflow check skips;
* ``paramwise_cfg`` from ``RoleOptimWrapperConstructor`` reaches the engine.

One process in float32 by default; two processes with bf16 weights (slow).

The first DeepSpeed use on a clean machine JIT-compiles a small CPU op.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from vdot_ext.engine.deepspeed_strategy import free_port

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
STAGES = ('zero2', 'zero3')



def run_worker(tmp_path, nproc, precision='fp32'):
    out = tmp_path / 'results.json'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    worker = osp.join(HERE, '_ds_wrapper_worker.py')
    if nproc == 1:
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            env.pop(key, None)
        cmd = [sys.executable, worker, str(out), precision]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               f'--master_port={free_port()}', worker, str(out), precision]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
    return [json.loads((tmp_path / f'results.json.rank{r}').read_text()) for r in range(nproc)]


def check(results, world):
    for rank, res in enumerate(results):
        assert res['world_size'] == world
        for stage in STAGES:
            r = res[stage]
            where = f'rank {rank} {stage}'
            nan = r['nan']
            # the NaN batch is on the last rank only: every rank sees non-finite gradients
            assert nan['finite'] == [True, False, True], where
            assert nan['skip_changed'] == 0.0 and nan['all_finite'], where
            assert nan['vs_reference'] == 0.0, where
            assert (nan['skipped'], nan['global_steps'], nan['micro_steps']) == (1, 3, 3), where
            forced = r['forced']
            assert forced['skip_changed'] == 0.0 and forced['vs_reference'] == 0.0, where
            assert forced['skipped'] == 1, where
            gas2 = r['gas2']
            # the bad window reports non-finite for both of its micro-batches
            assert gas2['finite'] == [False, False, True, True], where
            assert gas2['skip_changed'] == 0.0 and gas2['vs_reference'] == 0.0, where
            assert (gas2['skipped'], gas2['global_steps'], gas2['micro_steps']) == (1, 2, 4), where
            assert r['update_params']['skip_changed'] == 0.0 and r['update_params']['skipped'] == 1, where
            pw = r['paramwise']
            assert [(g['lr'], g['weight_decay']) for g in pw['groups']] == [
                (0.01, 0.01), (0.01, 0.0), (0.0, 0.01)], where   # plain, LayerNorm, lr_mult 0
            assert pw['last_changed'] == 0.0 and pw['first_changed'] > 0, where


@pytest.mark.timeout(600)
def test_skip_is_exact_one_process(tmp_path):
    check(run_worker(tmp_path, 1), 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_skip_agrees_across_two_processes_bf16(tmp_path):
    """Two ranks, NaN on rank 1 only, bf16 weights (DeepSpeed's bf16 overflow check path)."""
    results = run_worker(tmp_path, 2, 'bf16')
    check(results, 2)
