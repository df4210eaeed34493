"""Ablations as configs (configs/ablations/) and the sweep tool (vdot_ext.tools.ablate):

* every Table 3 row exists, each changes the stage-2 model and the evaluation model alike (no GAN drops
  the discriminator from both), seeds reach stage 2 only so the shared stages keep their hashes;
* on a recipe of call stages (fast): rows x seeds each in its own work dir, stages of identical config
  and upstream run once and are linked or copied into the other runs (the driver's markers accept
  them), a failed run does not stop the sweep and the same command continues it, the table holds
  mean ± std over seeds, and the iteration plot is drawn from the validation history;
* slow: the real tiny rows (2 rows x 2 seeds, a handful of iterations) as a user runs the command,
  killed with SIGKILL in the middle and run again, producing the table and both plots.
"""
import json
import math
import os
import os.path as osp
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mmengine.config import Config

from vdot_ext.registry import FUNCTIONS
from vdot_ext.tools import ablate
from vdot_ext.utils import write_json

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ROWS_DIR = osp.join(ROOT, 'configs', 'ablations')
CALLS = []
FAIL = {}


# ---------------------------------------------------------------------------
# the shipped rows
# ---------------------------------------------------------------------------
ABLATED = ('otd_loss', 'dmd_loss', 'discriminator', 'gan_loss', 'dm_weights', 'dm_weighting', 'generator_init',
           'gan_critic_trains', 'real_score', 'real_score_weights', 'guidance_scale', 'uncond')


def _row(name):
    return Config.fromfile(osp.join(ROWS_DIR, f'{name}.py'))


def test_table3_rows_and_option_rows_exist_and_ablate_both_models_alike():
    assert ablate.available_rows(ROWS_DIR)[:6] == list(ablate.TABLE3_ROWS)
    assert set(ablate.OPTION_ROWS) <= set(ablate.available_rows(ROWS_DIR))
    models = {}
    for name in ablate.TABLE3_ROWS + ablate.OPTION_ROWS:
        cfg = _row(name)
        stage2, evaluation = cfg.stages.stage2.runner.model, cfg.stages.evaluate.call.model
        # the evaluation copies the stage-2 model and loads its weights strictly
        assert {k: stage2.get(k) for k in ABLATED} == {k: evaluation.get(k) for k in ABLATED}, name
        assert any(h['type'] == 'ValidationHook' for h in cfg.stages.stage2.runner.custom_hooks), name
        assert cfg.ablation_label, name
        models[name] = (stage2, cfg.stages.stage2.runner.train_cfg.max_iters)
    full, full_iters = models['full']
    assert full['otd_loss'] and full['dmd_loss'] and full['discriminator'] and full['generator_init']
    assert full_iters == 1200
    assert models['accwaninit_untrained'][1] == 0                       # (1) evaluated as initialised
    dmd_only = models['dmd_only'][0]                                    # (2) Self-Forcing
    assert dmd_only['otd_loss'] is None and dmd_only['discriminator'] is None and dmd_only['gan_loss'] is None
    assert dmd_only['dmd_loss'] and dmd_only['generator_init']
    assert models['no_gan'][0]['discriminator'] is None and models['no_gan'][0]['gan_loss'] is None  # (3)
    assert models['no_gan'][0]['otd_loss']
    assert models['no_otd'][0]['otd_loss'] is None and models['no_otd'][0]['discriminator']           # (4)
    assert models['no_accwaninit'][0]['generator_init'] is None                                      # (5)
    assert models['weights_parity'][0]['dm_weighting'] == 'parity'
    assert models['weights_balanced'][0]['dm_weighting'] == 'balanced'
    assert models['weights_balanced'][0]['otd_loss']['normalize'] == 'none'
    assert models['gan_critic_heads'][0]['gan_critic_trains'] == 'heads'
    assert models['gan_critic_fake_score'][0]['gan_critic_trains'] == 'fake_score_and_heads'
    # each row builds the options the distiller has
    import inspect

    from vdot_ext.models.vdot_distiller import VDOTDistiller
    params = inspect.signature(VDOTDistiller).parameters
    assert {'dm_weighting', 'gan_critic_trains', 'schedule'} <= set(params)


def test_seed_reaches_stage2_and_the_shared_stages_keep_their_hash(tmp_path):
    path = osp.join(ROWS_DIR, 'full.py')
    hashes = {}
    for seed in (0, 3):
        cfg, _ = ablate.load_run_config(path, seed, ['stage2'], None)
        runner = cfg.stages.stage2.runner
        assert runner.randomness.seed == seed and runner.model.seed == seed
        assert 'randomness' not in cfg.stages.teacher.runner
        hashes[seed] = {name: stage.config_hash for name, stage in ablate._stages(cfg, str(tmp_path / 'x')).items()}
    # the evaluation is not seeded: every model meets the same noise
    assert [n for n in hashes[0] if hashes[0][n] != hashes[3][n]] == ['stage2']
    # no_gan and full share everything up to stage 2
    no_gan, _ = ablate.load_run_config(osp.join(ROWS_DIR, 'no_gan.py'), 0, ['stage2'], None)
    other = {name: stage.config_hash for name, stage in ablate._stages(no_gan, str(tmp_path / 'y')).items()}
    assert [n for n in other if other[n] == hashes[0][n]] == ['codecs', 'teacher', 'stage1']
    with pytest.raises(ValueError, match='--seed-stages nope'):
        ablate.load_run_config(path, 0, ['nope'], None)
    with pytest.raises(ValueError, match='--rows nope: no .*nope.py; rows in'):
        ablate.resolve_rows(['nope'], ROWS_DIR)
    assert [name for name, _ in ablate.resolve_rows(['table3', 'full'], ROWS_DIR)] == list(ablate.TABLE3_ROWS)


def test_options_for_every_row_leave_what_defines_a_row():
    short = {'stages.stage2.runner.train_cfg.max_iters': 3}
    untrained, kept = ablate.load_run_config(osp.join(ROWS_DIR, 'accwaninit_untrained.py'), 0, ['stage2'], short)
    assert untrained.stages.stage2.runner.train_cfg.max_iters == 0
    assert kept == ['stages.stage2.runner.train_cfg.max_iters=0']
    full, kept = ablate.load_run_config(osp.join(ROWS_DIR, 'full.py'), 0, ['stage2'], short)
    assert full.stages.stage2.runner.train_cfg.max_iters == 3 and kept == []


# ---------------------------------------------------------------------------
# the sweep machinery on call stages
# ---------------------------------------------------------------------------
@FUNCTIONS.register_module(name='ablation_test_prepare', force=True)
def ablation_test_prepare(work_dir, scale):
    CALLS.append(('prepare', work_dir))
    write_json(osp.join(work_dir, 'value.json'), dict(value=scale))
    return dict(value=scale)


@FUNCTIONS.register_module(name='ablation_test_train', force=True)
def ablation_test_train(work_dir, source, offset, seed=0):
    CALLS.append(('train', work_dir, seed))
    if FAIL.get('train') == (osp.basename(osp.dirname(osp.dirname(work_dir))), seed):
        raise RuntimeError('simulated crash')
    with open(source) as f:
        value = json.load(f)['value'] + offset + 0.1 * seed
    for k in (0, 5, 10):   # what ValidationHook writes
        write_json(osp.join(work_dir, 'validation', f'iter_{k}', 'metrics.json'),
                   dict(iteration=k, metrics={'t2v': {'score': value * k / 10}}))
    write_json(osp.join(work_dir, 'value.json'), dict(value=value))
    return dict(value=value)


@FUNCTIONS.register_module(name='ablation_test_evaluate', force=True)
def ablation_test_evaluate(work_dir, source):
    CALLS.append(('evaluate', work_dir))
    with open(source) as f:
        value = json.load(f)['value']
    write_json(osp.join(work_dir, 'metrics.json'), dict(
        metrics={'t2v': {'student/score': value, 'teacher/score': 0.5, 'real/score': 2.0}}, teacher_steps=40))
    return {}


def _write_row(folder, name, offset, scale=1.0):
    path = osp.join(folder, f'{name}.py')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(f"""\
            default_scope = 'vdot_ext'
            ablation_label = 'row {name}'
            stage_order = ['prepare', 'train', 'evaluate']
            stages = dict(
                prepare=dict(call=dict(type='ablation_test_prepare', scale={scale})),
                train=dict(call=dict(type='ablation_test_train', source='{{work_dir}}/prepare/value.json',
                                     offset={offset})),
                evaluate=dict(call=dict(type='ablation_test_evaluate', source='{{work_dir}}/train/value.json')))
            """))
    return path


def _sweep(rows_dir, root, rows, *extra):
    return ablate.main(['--rows', *rows, '--seeds', '0', '1', '--work-root', str(root), '--config-dir',
                        str(rows_dir), '--seed-stages', 'train', '--train-stage', 'train', '--student-steps', *extra])


def _calls(kind):
    return [c for c in CALLS if c[0] == kind]


@pytest.fixture
def rows_dir(tmp_path):
    folder = tmp_path / 'rows'
    folder.mkdir()
    _write_row(folder, 'a', offset=0.0)
    _write_row(folder, 'b', offset=1.0)
    _write_row(folder, 'a_again', offset=0.0)        # resolves equal to a
    _write_row(folder, 'c', offset=0.0, scale=2.0)   # another first stage
    CALLS.clear()
    FAIL.clear()
    yield folder
    FAIL.clear()


@pytest.mark.parametrize('mode', ['symlink', 'copy'])
def test_shared_prefix_runs_once_and_the_driver_accepts_it(rows_dir, tmp_path, mode):
    root = tmp_path / 'sweep'
    assert _sweep(rows_dir, root, ['a', 'b', 'a_again', 'c'], '--share-prefix', '--share-mode', mode) == 0
    # 4 rows x 2 seeds: 'prepare' ran for a (shared by b and a_again) and for c (another scale)
    assert sorted(osp.basename(osp.dirname(osp.dirname(w))) for _, w in _calls('prepare')) == ['a', 'c']
    # train ran per seed for a, b and c; a_again shares a's runs whole (same config, same upstream)
    trained = sorted((osp.basename(osp.dirname(osp.dirname(w))), s) for _, w, s in _calls('train'))
    assert trained == [('a', 0), ('a', 1), ('b', 0), ('b', 1), ('c', 0), ('c', 1)]
    shared = root / 'b' / 'seed1' / 'prepare'
    assert shared.is_symlink() == (mode == 'symlink') and (shared / 'stage_done.json').is_file()
    if mode == 'symlink':
        assert os.readlink(shared) == osp.join('..', '..', 'a', 'seed0', 'prepare')   # relative
    with open(root / 'a' / 'seed0' / 'prepare' / 'stage_done.json') as f, \
            open(root / 'b' / 'seed1' / 'prepare' / 'stage_done.json') as g:
        assert json.load(f)['run_id'] == json.load(g)['run_id']
    # the driver skipped the shared stages (no refusal, no rerun)
    log = (root / 'a_again' / 'seed1' / 'stages.log').read_text()
    assert log.count('already done') == 3

    results = json.loads((root / ablate.RESULTS_FILE).read_text())
    cells = results['summary']['rows']
    mean, std, n = cells['b']['t2v score']
    assert n == 2 and mean == pytest.approx(2.05) and std == pytest.approx(0.1 / math.sqrt(2))
    assert cells['a_again']['t2v score'] == cells['a']['t2v score']
    assert cells['c']['t2v score'][0] == pytest.approx(2.05)
    table = (root / ablate.TABLE_FILE).read_text()
    assert '| row b (`b`) | 2 | 2.050 ± 0.071 |' in table
    assert '*teacher, 40 steps* (reference)' in table and '*real* (reference)' in table
    assert (root / ablate.ITERATIONS_PLOT).stat().st_size > 0
    assert results['iterations']['t2v score']['b']['10'][0] == pytest.approx(2.05)


def test_without_sharing_each_run_computes_every_stage(rows_dir, tmp_path):
    assert _sweep(rows_dir, tmp_path / 'sweep', ['a', 'b']) == 0
    assert len(_calls('prepare')) == 4 and len(_calls('train')) == 4
    assert not (tmp_path / 'sweep' / 'b' / 'seed0' / 'prepare').is_symlink()


def test_a_stage_is_shared_only_with_the_runs_it_consumed(rows_dir, tmp_path):
    """Runs swept without sharing each own a 'prepare' of the same config; a later run links the first
    one's 'prepare' and may then share only trains that consumed that very one."""
    root = tmp_path / 'sweep'
    assert _sweep(rows_dir, root, ['a']) == 0
    CALLS.clear()
    assert _sweep(rows_dir, root, ['a_again'], '--share-prefix') == 0
    # seed 0 shares a/seed0 whole; seed 1 links a/seed0's prepare, so a/seed1's train (which consumed
    # a/seed1's own prepare) is not its upstream: it trains itself
    assert [(osp.basename(osp.dirname(osp.dirname(w))), s) for _, w, s in _calls('train')] == [('a_again', 1)]
    assert not _calls('prepare')


def test_a_failed_run_does_not_stop_the_sweep_and_the_same_command_continues(rows_dir, tmp_path):
    root = tmp_path / 'sweep'
    FAIL['train'] = ('b', 1)
    assert _sweep(rows_dir, root, ['a', 'b'], '--share-prefix') == 1
    assert json.loads((root / ablate.RESULTS_FILE).read_text())['summary']['rows']['b']['n'] == 1
    assert 'failed runs: b/seed1' in (root / 'ablate.log').read_text()
    FAIL.clear()
    CALLS.clear()
    assert _sweep(rows_dir, root, ['a', 'b'], '--share-prefix') == 0
    # only the interrupted run's remaining stages ran
    assert [(osp.basename(osp.dirname(osp.dirname(w))), s) for _, w, s in _calls('train')] == [('b', 1)]
    assert len(_calls('evaluate')) == 1 and not _calls('prepare')
    assert json.loads((root / ablate.RESULTS_FILE).read_text())['summary']['rows']['b']['n'] == 2
    # --report-only runs nothing
    CALLS.clear()
    assert ablate.main(['--rows', 'a', 'b', '--seeds', '0', '1', '--work-root', str(root), '--config-dir',
                        str(rows_dir), '--seed-stages', 'train', '--train-stage', 'train', '--report-only']) == 0
    assert not CALLS


# ---------------------------------------------------------------------------
# the real tiny rows, as a user runs them (slow)
# ---------------------------------------------------------------------------
SHORT = [
    'stages.codecs.call.vae_steps=8', 'stages.codecs.call.num_train_videos=4',
    'stages.teacher.runner.train_cfg.max_iters=4', 'stages.teacher.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage1.runner.train_cfg.max_iters=3', 'stages.stage1.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage2.runner.train_cfg.max_iters=6', 'stages.stage2.runner.train_dataloader.dataset.num_samples=8',
    'stages.stage2.runner.train_dataloader.batch_size=2', 'stages.stage2.runner.default_hooks.checkpoint.interval=2',
    'stages.evaluate.call.dataset.num_samples=4', 'stages.evaluate.call.samples_per_task=1',
    'stages.evaluate.call.teacher_steps=3',
]


def _ablate_command(root):
    return [sys.executable, '-m', 'vdot_ext.tools.ablate', '--rows', 'full', 'no_gan', '--seeds', '0', '1',
            '--work-root', str(root), '--share-prefix', '--teacher-steps', '2', '4', '--cfg-options-allow-new',
            '--cfg-options', *SHORT]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_ablation_killed_and_continued_gives_the_table_and_plots(tmp_path):
    root = tmp_path / 'ablations'
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    # kill the sweep (SIGKILL, the whole process) once the second run's stage 2 has started
    proc = subprocess.Popen(_ablate_command(root), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = root / 'no_gan' / 'seed0' / 'stage2' / 'stage_started.json'
    deadline = time.time() + 1200
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), 'the sweep never reached the second run'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = json.loads((root / 'full' / 'seed0' / 'stage2' / 'stage_done.json').read_text())['run_id']

    done = subprocess.run(_ablate_command(root), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the finished run was not redone; the shared stages were linked, not rerun
    assert json.loads((root / 'full' / 'seed0' / 'stage2' / 'stage_done.json').read_text())['run_id'] == first
    assert 'already done' in (root / 'full' / 'seed0' / 'stages.log').read_text()
    for row, seed in (('no_gan', 0), ('full', 1), ('no_gan', 1)):
        for stage in ('codecs', 'teacher', 'stage1'):
            assert (root / row / f'seed{seed}' / stage).is_symlink(), (row, seed, stage)
    results = json.loads((root / ablate.RESULTS_FILE).read_text())
    for row in ('full', 'no_gan'):
        cells = results['summary']['rows'][row]
        assert cells['n'] == 2
        mean, std, n = cells['mv2v_outpaint kept_psnr']
        assert n == 2 and math.isfinite(mean) and std is not None
        # validation at iterations 0, 2, 4 (every 200 → every run's end) and 6
        assert sorted(map(int, results['rows'][row]['seeds']['0']['validation'])) == [0, 6]
        steps = results['steps']['mv2v_outpaint kept_psnr']['rows'][row]
        assert sorted(map(int, steps)) == [1, 2, 4, 8]
    assert sorted(map(int, results['steps']['mv2v_outpaint kept_psnr']['teacher'])) == [2, 4]
    # no GAN: the evaluation model has no discriminator, and stage 2 never stepped a GAN objective
    from vdot_ext.engine.hooks import read_loss_curves
    curves = read_loss_curves(str(root / 'no_gan' / 'seed1' / 'stage2' / 'iter_6.pth'))
    assert not any('gan' in k for k in curves) and any('gan' in k for k in read_loss_curves(
        str(root / 'full' / 'seed1' / 'stage2' / 'iter_6.pth')))
    table = (root / ablate.TABLE_FILE).read_text()
    assert '(3) no GAN' in table and '(6) VDOT' in table and 'Quality vs sampling steps' in table
    for plot in (ablate.STEPS_PLOT, ablate.ITERATIONS_PLOT):
        assert (root / plot).stat().st_size > 10_000


def test_apply_seed_overrides_a_seed_the_runner_already_sets():
    """A runner whose randomness already holds a seed gets the row's seed (a duplicate keyword used to raise
    TypeError)."""
    from mmengine.config import Config

    from vdot_ext.tools.ablate import apply_seed
    cfg = Config(dict(randomness=dict(seed=0, deterministic=False), stages=dict(stage2=dict(runner=dict(
        randomness=dict(seed=5), model=dict(type='VDOTDistiller'))))))
    apply_seed(cfg, 7, ['stage2'], 'row.py')
    runner = cfg.stages.stage2.runner
    assert runner.randomness == dict(seed=7, deterministic=False) and runner.model.seed == 7
