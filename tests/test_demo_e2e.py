"""`mim train vdot_ext configs/vdot_tiny.py` in a subprocess, as a user runs it.

The default run shortens every stage; the full demo (as README's first command
runs it) is marked ``slow``.
"""
import json
import os
import os.path as osp
import shutil
import subprocess

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = ('t2v', 'r2v', 'v2v_gray', 'mv2v_outpaint')
TRAINING_STAGES = ('teacher', 'stage1', 'stage2')

SHORT = [
    'stages.codecs.call.vae_steps=8', 'stages.codecs.call.num_train_videos=4',
    'stages.teacher.runner.train_cfg.max_iters=4',
    'stages.teacher.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage1.runner.train_cfg.max_iters=3',
    'stages.stage1.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage2.runner.train_cfg.max_iters=3',
    'stages.stage2.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage2.runner.train_dataloader.batch_size=2',
    'stages.evaluate.call.dataset.num_samples=4',
    'stages.evaluate.call.samples_per_task=1', 'stages.evaluate.call.teacher_steps=3',
]


def _mim():
    mim = shutil.which('mim')
    if mim is None:
        pytest.fail('the `mim` command is not on PATH: install openmim (README)')
    return mim


def _run(work_dir, options=(), timeout=1200, expect_ok=True):
    cmd = [_mim(), 'train', 'vdot_ext', 'configs/vdot_tiny.py', '--work-dir', str(work_dir)]
    if options:
        cmd += ['--cfg-options', *options]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _check_outputs(work_dir):
    for stage in ('codecs', *TRAINING_STAGES, 'evaluate'):
        assert osp.isfile(osp.join(work_dir, stage, 'stage_done.json')), stage
    for stage in TRAINING_STAGES:
        assert osp.isfile(osp.join(work_dir, stage, 'final_model.pth')), stage
        assert osp.isfile(osp.join(work_dir, stage, 'loss_curve.png')), stage
    from vdot_ext.engine.checkpointing import resolve_resume_checkpoint
    from vdot_ext.engine.hooks import read_loss_curves
    losses = read_loss_curves(resolve_resume_checkpoint(osp.join(work_dir, 'stage2')))
    # stage 2 ran the distribution-matching generator step and both critic objectives
    assert {'surrogate_gen_otd', 'loss_gen_dmd', 'loss_critic_denoise', 'loss_critic_gan'} <= set(losses)
    with open(osp.join(work_dir, 'evaluate', 'metrics.json')) as f:
        metrics = json.load(f)
    assert set(metrics['metrics']) == set(TASKS)
    assert metrics['student_steps'] == 4
    for task in ('mv2v_outpaint', 'v2v_gray'):
        keys = metrics['metrics'][task]
        assert any(k.startswith('teacher/') for k in keys)
        assert any(k.startswith('student/') for k in keys)
    samples = sorted(os.listdir(osp.join(work_dir, 'evaluate', 'samples')))
    assert {s.split('_0')[0] for s in samples} == set(TASKS)
    from decord import VideoReader
    reader = VideoReader(osp.join(work_dir, 'evaluate', 'samples', samples[0]))
    assert len(reader) == 17
    return metrics


@pytest.mark.timeout(1500)
def test_mim_train_tiny_demo_short(tmp_path):
    work_dir = tmp_path / 'demo'
    _run(work_dir, SHORT)
    _check_outputs(str(work_dir))
    # a second run finds every stage done and redoes nothing
    proc = _run(work_dir, SHORT)
    log = open(osp.join(work_dir, 'stages.log')).read()
    assert log.count('already done') == 5, proc.stdout[-2000:]
    # a changed config is refused before anything runs, naming the key
    changed = [o for o in SHORT if not o.startswith('stages.evaluate.call.teacher_steps=')]
    proc = _run(work_dir, changed + ['stages.evaluate.call.teacher_steps=4'], expect_ok=False)
    assert proc.returncode != 0
    assert 'stages.evaluate.call.teacher_steps: 3 -> 4' in proc.stderr, proc.stderr[-4000:]
    assert '--force-rerun evaluate' in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_mim_train_tiny_demo_full(tmp_path):
    """README's first command: the whole demo; the student keeps the conditions."""
    work_dir = tmp_path / 'demo'
    _run(work_dir, timeout=3600)
    metrics = _check_outputs(str(work_dir))['metrics']
    out = metrics['mv2v_outpaint']
    # the 4-step student keeps the outpainting condition about as well as the teacher
    assert out['student/kept_psnr'] > out['teacher/kept_psnr'] - 3.0, out
