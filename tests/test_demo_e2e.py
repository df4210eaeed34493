"""`mim train vdot_ext configs/vdot_tiny.py` in a subprocess, as a user runs it.

The default run installs the shipped demo assets (codecs, teacher) and shortens
the other stages; the from-scratch path (``VDOT_DEMO_ASSETS=none``) is run for its
codecs and teacher stages; the full demo (as README's first command runs it) is
marked ``slow``.
"""
import json
import os
import os.path as osp
import shutil
import subprocess

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = ('t2v', 'r2v', 'v2v_gray', 'mv2v_outpaint')
TRAINING_STAGES = ('teacher', 'stage1', 'stage2')

SHORT = [
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


def _run(work_dir, options=(), timeout=1200, expect_ok=True, assets=None, stages=None):
    cmd = [_mim(), 'train', 'vdot_ext', 'configs/vdot_tiny.py', '--work-dir', str(work_dir)]
    if stages:
        cmd += ['--stages', *stages]
    if options:
        cmd += ['--cfg-options', *options]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('VDOT_DEMO_ASSETS', None)
    if assets is not None:
        env['VDOT_DEMO_ASSETS'] = assets
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
    for stage in ('stage1', 'stage2'):  # the shipped teacher trains 0 iterations: no curve
        assert osp.isfile(osp.join(work_dir, stage, 'loss_curve.png')), stage
    _check_shipped_install(work_dir)
    from vdot_ext.engine.checkpointing import resolve_resume_checkpoint
    from vdot_ext.engine.hooks import read_loss_curves
    losses = read_loss_curves(resolve_resume_checkpoint(osp.join(work_dir, 'stage2')))
    # stage 2 ran the distribution-matching generator step and both critic objectives
    assert {'surrogate_gen_otd', 'loss_gen_dmd', 'loss_critic_denoise', 'loss_critic_gan'} <= set(losses)
    with open(osp.join(work_dir, 'evaluate', 'metrics.json')) as f:
        metrics = json.load(f)
    assert set(metrics['metrics']) == set(TASKS)
    assert metrics['student_steps'] == 4 and metrics['teacher_few_steps'] == 4
    for task in ('mv2v_outpaint', 'v2v_gray'):
        keys = metrics['metrics'][task]
        for row in ('real', 'codec', 'teacher', 'teacher_few', 'student'):
            assert any(k.startswith(row + '/') for k in keys), (row, keys)
            assert set(metrics['standard_errors'][task]) == set(keys)
    assert open(osp.join(work_dir, 'evaluate', 'metrics.md')).read().startswith('| task | metric | n |')
    samples = sorted(os.listdir(osp.join(work_dir, 'evaluate', 'samples')))
    assert {s.split('_0')[0] for s in samples} == set(TASKS)
    from decord import VideoReader
    reader = VideoReader(osp.join(work_dir, 'evaluate', 'samples', samples[0]))
    assert len(reader) == 17
    return metrics


def _check_shipped_install(work_dir):
    """The codecs and teacher stages installed the shipped assets, byte for byte in weights."""
    from safetensors.torch import load_file

    from vdot_ext.models.tiny_codecs import DEMO_ASSET_FILES, DEMO_ASSETS_DIR, TinyWanVAE
    from vdot_ext.models.weights import read_state_dict
    shipped = TinyWanVAE.load_safetensors(osp.join(DEMO_ASSETS_DIR, DEMO_ASSET_FILES['vae']))
    installed = TinyWanVAE.load(osp.join(work_dir, 'codecs', 'tiny_wan_vae.pth'))
    for key, value in shipped.model.state_dict().items():
        assert torch.equal(installed.model.state_dict()[key], value), key
    teacher = load_file(osp.join(DEMO_ASSETS_DIR, DEMO_ASSET_FILES['teacher']))
    final = read_state_dict(osp.join(work_dir, 'teacher', 'final_model.pth'))
    assert {k: v for k, v in final.items() if k.startswith('score.')}.keys() == {f'score.{k}' for k in teacher}
    for key, value in teacher.items():
        assert torch.equal(final[f'score.{key}'], value), key


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


@pytest.mark.timeout(1500)
def test_mim_train_from_scratch_flag(tmp_path):
    """VDOT_DEMO_ASSETS=none: the codecs and teacher stages train instead of installing the assets."""
    work_dir = tmp_path / 'scratch'
    options = ['stages.codecs.call.vae_steps=4', 'stages.codecs.call.num_train_videos=2',
               'stages.teacher.runner.train_cfg.max_iters=3',
               'stages.teacher.runner.train_dataloader.dataset.num_samples=8']
    _run(work_dir, options, assets='none', stages=['codecs', 'teacher'])
    with open(osp.join(work_dir, 'codecs', 'tiny_codecs.json')) as f:
        assert json.load(f)['vae']['steps'] == 4  # trained here, not installed
    with open(osp.join(work_dir, 'teacher', 'stage_done.json')) as f:
        assert json.load(f)['result']['iterations'] == 3
    assert osp.isfile(osp.join(work_dir, 'teacher', 'loss_curve.png'))
    # a missing asset folder is a clear error naming the folder and the command that makes it
    proc = _run(tmp_path / 'missing', SHORT, assets=str(tmp_path / 'no_assets'), stages=['codecs'],
                expect_ok=False)
    assert proc.returncode != 0
    assert 'no_assets' in proc.stderr and 'make_demo_assets' in proc.stderr, proc.stderr[-3000:]
