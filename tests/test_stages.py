"""The stage driver: validation errors, {work_dir} substitution, markers with a
config hash (skip, refuse, force a rerun), resume of an interrupted training
stage, and rank 0 as the only writer when several processes run a recipe."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
from mmengine.config import Config
from mmengine.hooks import Hook

from vdot_ext.engine.compat import install_safe_checkpoint_loader
from vdot_ext.engine.config_checks import ConfigCheckError, check_required_fields
from vdot_ext.engine.deepspeed_strategy import free_port
from vdot_ext.engine.hooks import read_loss_curves
from vdot_ext.engine.stages import (
    DONE_FILE,
    REPLACED_DIR,
    STARTED_FILE,
    StageConflictError,
    run_stages,
    validate_stages,
)
from vdot_ext.registry import FUNCTIONS, HOOKS
from vdot_ext.utils import safe_torch_load

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CALLS = []
CRASH = {}


@FUNCTIONS.register_module(name='record_call_for_test', force=True)
def record_call_for_test(work_dir, path, value):
    CALLS.append((work_dir, path, value))
    return dict(path=path, value=value)


class SimulatedKill(RuntimeError):
    pass


@HOOKS.register_module(name='CrashAfterIterForTest', force=True)
class CrashAfterIterForTest(Hook):
    """Kills the run (an exception) after iteration ``CRASH['iter']``, when set:
    the config stays the same between the crashed run and its rerun."""

    priority = 'LOWEST'   # after the checkpoint hook has saved that iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if CRASH.get('iter') == runner.iter + 1:
            raise SimulatedKill(f'simulated kill after iteration {runner.iter + 1}')


def _cfg(stages, order=None):
    cfg = dict(default_scope='vdot_ext', stages=stages,
               log_processor=dict(by_epoch=False),
               default_hooks=dict(checkpoint=dict(type='VDOTCheckpointHook', interval=2,
                                                  by_epoch=False)),
               custom_hooks=[dict(type='LossCurveHook', interval=1),
                             dict(type='CrashAfterIterForTest')])
    if order is not None:
        cfg['stage_order'] = order
    return Config(cfg)


def _teacher_stage(max_iters):
    return dict(runner=dict(
        model=dict(type='FlowMatchingPretrainer',
                   score=dict(type='WanVACEScore', preset='tiny-vace')),
        train_dataloader=dict(batch_size=2, num_workers=0,
                              sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate'),
                              dataset=dict(type='RandomLatentsForTest')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=dict(constructor='RoleOptimWrapperConstructor',
                           score=dict(optimizer=dict(type='AdamW', lr=1e-3)))))


def _calls(**values):
    """Call stages a, b, c (in that order) recording `value`."""
    return _cfg({name: dict(call=dict(type='record_call_for_test', path=f'{{work_dir}}/{name}/out',
                                      value=value))
                 for name, value in values.items()})


def test_validation_names_the_field():
    with pytest.raises(ValueError, match='"stages"'):
        validate_stages(Config(dict(stages={})))
    with pytest.raises(ValueError, match=r"stage_order names \['b'\]"):
        validate_stages(_cfg(dict(a=dict(call=dict(type='x'))), order=['a', 'b']))
    with pytest.raises(ValueError, match='stages.a must have exactly one'):
        validate_stages(_cfg(dict(a=dict(call=dict(type='x'), runner=dict()))))
    with pytest.raises(ValueError, match='stages.a.runner.model is missing'):
        validate_stages(_cfg(dict(a=dict(runner=dict(train_cfg={})))))
    with pytest.raises(ValueError, match='stages.a.call.type'):
        validate_stages(_cfg(dict(a=dict(call=dict()))))


@FUNCTIONS.register_module(name='record_threads_for_test', force=True)
def record_threads_for_test(work_dir):
    import torch
    CALLS.append(('threads', torch.get_num_threads()))
    return {}


def test_a_stage_sets_its_own_thread_count_and_it_is_not_hashed(tmp_path):
    """stages.<name>.torch_num_threads: the stage runs with that count, the next stage with the process's;
    changing it neither reruns nor refuses a finished stage; a misspelt stage key is an error."""
    import torch
    CALLS.clear()
    before = torch.get_num_threads()
    own = 2 if before != 2 else 1
    stages = dict(a=dict(call=dict(type='record_threads_for_test'), torch_num_threads=own),
                  b=dict(call=dict(type='record_threads_for_test')))
    run_stages(_cfg(stages), str(tmp_path))
    assert CALLS == [('threads', own), ('threads', before)] and torch.get_num_threads() == before
    stages['a']['torch_num_threads'] = before
    run_stages(_cfg(stages), str(tmp_path))        # how it runs, not what it computes: skipped
    assert len(CALLS) == 2
    with pytest.raises(ConfigCheckError, match=r"stages.a: unknown key\(s\) \['torch_num_thread'\]"):
        validate_stages(_cfg(dict(a=dict(call=dict(type='x'), torch_num_thread=2))))
    with pytest.raises(ConfigCheckError, match='stages.a.torch_num_threads: expected a positive int'):
        validate_stages(_cfg(dict(a=dict(call=dict(type='x'), torch_num_threads=0))))


def test_required_marker_is_reported_with_its_path():
    cfg = Config(dict(model=dict(score=dict(pretrained='??? the weights')),
                      data=['ok', '??? a manifest']))
    with pytest.raises(ValueError) as err:
        check_required_fields(cfg, 'c.py')
    assert 'model.score.pretrained: the weights' in str(err.value)
    assert 'data.1: a manifest' in str(err.value)


def test_every_stage_is_checked_before_the_first_runs(tmp_path):
    CALLS.clear()
    teacher = _teacher_stage(2)
    teacher['runner']['model']['score']['pretrained'] = '??? the teacher weights'
    teacher['runner']['model']['timestep_shfit'] = 3.0
    teacher['runner']['train_dataloader']['dataset']['type'] = 'RandomLatentsForTst'
    cfg = _cfg(dict(prep=dict(call=dict(type='record_call_for_test', path='p', value=1)), teacher=teacher))
    with pytest.raises(ConfigCheckError, match='stages.teacher.runner.model.score.pretrained: the teacher'):
        run_stages(cfg, str(tmp_path))
    teacher['runner']['model']['score'].pop('pretrained')
    with pytest.raises(ConfigCheckError) as err:
        run_stages(_cfg(dict(prep=dict(call=dict(type='record_call_for_test', path='p', value=1)),
                             teacher=teacher)), str(tmp_path))
    assert "stages.teacher.runner.model.timestep_shfit: FlowMatchingPretrainer has no keyword" in str(err.value)
    assert "stages.teacher.runner.train_dataloader.dataset.type: 'RandomLatentsForTst' is not registered" \
        in str(err.value)
    # a call stage's function must take the work_dir the driver passes
    with pytest.raises(ConfigCheckError, match=r"'evaluate_vdot' has no keyword 'smaples_per_task'|"
                                               r"evaluate_vdot has no keyword 'smaples_per_task'"):
        run_stages(_cfg(dict(ev=dict(call=dict(type='evaluate_vdot', smaples_per_task=1)))), str(tmp_path))
    assert CALLS == [] and not (tmp_path / 'prep').exists()


def test_function_stages_substitute_and_skip_when_done(tmp_path):
    CALLS.clear()
    cfg = _calls(prep=3)
    out = run_stages(cfg, str(tmp_path))
    assert CALLS == [(str(tmp_path / 'prep'), f'{tmp_path}/prep/out', 3)]
    assert out['prep']['path'] == f'{tmp_path}/prep/out'
    done = json.loads((tmp_path / 'prep' / DONE_FILE).read_text())
    assert done['result']['path'] == out['prep']['path']
    # the marker holds the resolved config with the work dir written as {work_dir}
    assert done['config']['call']['path'] == '{work_dir}/prep/out'
    assert len(done['config_hash']) == 64
    assert not (tmp_path / 'prep' / STARTED_FILE).exists()
    assert run_stages(cfg, str(tmp_path))['prep'] == out['prep']   # finished: skipped
    assert len(CALLS) == 1


def test_changed_config_refuses_before_any_stage_runs(tmp_path):
    """README's ablations used to rerun in the demo's work dir and get the old results."""
    CALLS.clear()
    run_stages(_calls(a=1, b=2, c=3), str(tmp_path))
    assert len(CALLS) == 3
    with pytest.raises(StageConflictError) as err:
        run_stages(_calls(a=1, b=20, c=3), str(tmp_path))
    message = str(err.value)
    assert 'stages.b.call.value: 2 -> 20' in message
    assert '--force-rerun b' in message and '--rerun-changed' in message and '--work-dir' in message
    assert 'Nothing was run' in message
    assert len(CALLS) == 3
    assert json.loads((tmp_path / 'b' / DONE_FILE).read_text())['result']['value'] == 2


def test_rerun_changed_reruns_the_stage_and_the_later_ones(tmp_path):
    CALLS.clear()
    run_stages(_calls(a=1, b=2, c=3), str(tmp_path))
    out = run_stages(_calls(a=1, b=20, c=3), str(tmp_path), rerun_changed=True)
    # a is unchanged and skipped; b changed; c consumes b, so it reruns too
    assert [c[2] for c in CALLS] == [1, 2, 3, 20, 3]
    assert out['b']['value'] == 20
    replaced = list((tmp_path / REPLACED_DIR).glob('*'))
    assert len(replaced) == 1 and sorted(p.name for p in replaced[0].iterdir()) == ['b', 'c']
    assert json.loads((replaced[0] / 'b' / DONE_FILE).read_text())['result']['value'] == 2
    run_stages(_calls(a=1, b=20, c=3), str(tmp_path))         # now up to date
    assert len(CALLS) == 5


def test_force_rerun_cascades_and_a_skipped_consumer_is_then_stale(tmp_path):
    CALLS.clear()
    cfg = _calls(a=1, b=2, c=3)
    run_stages(cfg, str(tmp_path))
    run_stages(cfg, str(tmp_path), force_rerun=['b'])
    assert [c[2] for c in CALLS] == [1, 2, 3, 2, 3]
    # rerun a alone: b and c finished on a's previous outputs
    run_stages(cfg, str(tmp_path), only=['a'], force_rerun=['a'])
    with pytest.raises(StageConflictError, match=r"earlier stage\(s\) \['a'\]"):
        run_stages(cfg, str(tmp_path))
    with pytest.raises(ConfigCheckError, match='not among the stages to run'):
        run_stages(cfg, str(tmp_path), only=['c'], force_rerun=['a'])


def test_markers_survive_moving_the_work_dir(tmp_path):
    CALLS.clear()
    cfg = _calls(a=1)
    run_stages(cfg, str(tmp_path / 'one'))
    shutil.copytree(tmp_path / 'one', tmp_path / 'two')
    run_stages(cfg, str(tmp_path / 'two'))
    assert len(CALLS) == 1


def test_interrupted_training_stage_resumes_and_refuses_a_changed_config(tmp_path):
    install_safe_checkpoint_loader()
    stage_dir = tmp_path / 'teacher'
    CRASH['iter'] = 3
    try:
        with pytest.raises(SimulatedKill):
            run_stages(_cfg(dict(teacher=_teacher_stage(6))), str(tmp_path))
    finally:
        CRASH.clear()
    assert (stage_dir / STARTED_FILE).exists() and not (stage_dir / DONE_FILE).exists()
    assert (stage_dir / 'iter_2.pth').exists()
    # resuming with another plan would mix two configs in one run
    with pytest.raises(StageConflictError, match=r'stages.teacher.runner.train_cfg.max_iters: 6 -> 8'):
        run_stages(_cfg(dict(teacher=_teacher_stage(8))), str(tmp_path))
    out = run_stages(_cfg(dict(teacher=_teacher_stage(6))), str(tmp_path))
    assert out['teacher']['iterations'] == 6
    logs = sorted(stage_dir.glob('*/*.log'))
    assert any('resumed' in p.read_text().lower() for p in logs), logs
    final = safe_torch_load(str(stage_dir / 'final_model.pth'))
    done = json.loads((stage_dir / DONE_FILE).read_text())
    assert final['meta']['iter'] == 6 and final['meta']['config_hash'] == done['config_hash']
    # the loss curve continues across the interruption
    curve = read_loss_curves(str(stage_dir / 'iter_6.pth'))['loss_flow']
    assert [int(p[0]) for p in curve] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------
RANK_MODULE = '''
import os
from mmengine.dist import get_dist_info
from vdot_ext.registry import FUNCTIONS


@FUNCTIONS.register_module(name='note_rank_for_test', force=True)
def note_rank_for_test(work_dir, value):
    rank = get_dist_info()[0]
    os.makedirs(work_dir, exist_ok=True)
    open(os.path.join(work_dir, f'ran_on_rank{rank}'), 'w').close()
    return dict(rank=rank, value=value)
'''


WORKER = '''
import sys
from vdot_ext.tools.train import main
argv = sys.argv[1:]
main(argv)
try:
    main(argv + ['--cfg-options', 'stages.b.call.value=3'])
except SystemExit as exc:
    print('REFUSED', exc.code, file=sys.stderr)
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_only_rank0_runs_calls_and_writes_markers(tmp_path):
    """torchrun, 2 processes (gloo): call stages run on rank 0 only, which alone
    writes the markers; both processes get the results and refuse a changed
    config. About 25 s on an idle 2-core machine (two Python start-ups)."""
    (tmp_path / 'rank_module_for_test.py').write_text(RANK_MODULE)
    (tmp_path / 'worker.py').write_text(WORKER)
    (tmp_path / 'recipe.py').write_text(textwrap.dedent('''
        default_scope = 'vdot_ext'
        custom_imports = dict(imports=['rank_module_for_test'], allow_failed_imports=False)
        env_cfg = dict(dist_cfg=dict(backend='gloo'))
        stages = dict(a=dict(call=dict(type='note_rank_for_test', value=1)),
                      b=dict(call=dict(type='note_rank_for_test', value=2)))
        '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]), OMP_NUM_THREADS='1')
    work = tmp_path / 'work'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}', str(tmp_path / 'worker.py'), str(tmp_path / 'recipe.py'),
           '--work-dir', str(work), '--launcher', 'pytorch']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ('a', 'b'):
        assert sorted(os.listdir(work / stage)) == sorted([DONE_FILE, 'ran_on_rank0'])
        assert json.loads((work / stage / DONE_FILE).read_text())['result']['rank'] == 0
    # both processes refuse the changed config before anything runs
    refusals = [line for line in proc.stderr.splitlines() if line.startswith('REFUSED')]
    assert len(refusals) == 2, proc.stderr[-3000:]
    assert proc.stderr.count('stages.b.call.value: 2 -> 3') == 2
    assert not (work / REPLACED_DIR).exists()


DEEPSPEED_RECIPE = '''
default_scope = 'vdot_ext'
custom_imports = dict(imports=['_deepspeed_worker', 'rank_module_for_test'], allow_failed_imports=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
strategy = dict(type='RoleDeepSpeedStrategy', config=dict(zero_optimization=dict(stage=3)))
log_processor = dict(by_epoch=False)
default_hooks = dict(checkpoint=dict(type='VDOTCheckpointHook', interval=1, by_epoch=False))
stages = dict(
    train=dict(runner=dict(
        model=dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'),
                   discriminator=None, otd_loss=None, gan_loss=None, dmd_loss=dict(type='DMDLoss'),
                   gen_every=2, guidance_scale=2.0, uncond='zeros'),
        train_dataloader=dict(batch_size=1, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate'), dataset=dict(type='RandomLatentVCUs')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=2),
        optim_wrapper=dict(constructor='RoleOptimWrapperConstructor',
                           generator=dict(optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999))),
                           critic=dict(optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999)))))),
    after=dict(call=dict(type='note_rank_for_test', value=1)))
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_train_a_deepspeed_stage_and_rank0_writes_its_outputs(tmp_path):
    """torchrun, 2 processes, ZeRO-3 on CPU: the driver starts the process group
    before the first stage; both ranks train, rank 0 writes the gathered final
    weights and the marker, and the run has one log folder (the same
    experiment name on both ranks). About 60 s on a busy 2-core machine."""
    (tmp_path / 'rank_module_for_test.py').write_text(RANK_MODULE)
    (tmp_path / 'recipe.py').write_text(DEEPSPEED_RECIPE)
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, osp.join(ROOT, 'tests')]))
    work = tmp_path / 'work'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}', '-m', 'vdot_ext.tools.train', str(tmp_path / 'recipe.py'),
           '--work-dir', str(work), '--launcher', 'pytorch']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = safe_torch_load(str(work / 'train' / 'final_model.pth'))
    assert final['meta']['iter'] == 2 and any(k.startswith('generator.') for k in final['state_dict'])
    assert json.loads((work / 'train' / DONE_FILE).read_text())['result']['iterations'] == 2
    # one experiment (log) folder; DeepSpeed-strategy checkpoints are folders too
    assert len([p for p in (work / 'train').iterdir() if p.is_dir() and not p.name.startswith('iter_')]) == 1
    assert sorted(os.listdir(work / 'after')) == sorted([DONE_FILE, 'ran_on_rank0'])
