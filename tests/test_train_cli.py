"""``tools/train.py`` (the ``mim train`` entry point): config mistakes stop the
run before any work (unknown ``--cfg-options`` keys, a typo in a later stage,
a distributed launch without a strategy), and ``--resume [CHECKPOINT]``."""
import glob
import os.path as osp
import textwrap
import time

import pytest

from vdot_ext.registry import FUNCTIONS
from vdot_ext.tools.train import main

STAGE1_CALLS = []


@FUNCTIONS.register_module(name='cheap_first_stage_for_cli_test', force=True)
def cheap_first_stage_for_cli_test(work_dir, value=0):
    STAGE1_CALLS.append(value)
    return dict(value=value)


TEACHER = '''dict(
    model=dict(type='FlowMatchingPretrainer', score=dict(type='WanVACEScore', preset='tiny-vace'){extra}),
    train_dataloader=dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                          collate_fn=dict(type='default_collate'),
                          dataset=dict(type='RandomLatentsForTest')),
    train_cfg=dict(type='IterBasedTrainLoop', max_iters=2),
    optim_wrapper=dict(constructor='RoleOptimWrapperConstructor',
                       score=dict(optimizer=dict(type='AdamW', lr=1e-3))))'''


def _staged(tmp_path, extra=''):
    path = tmp_path / 'recipe.py'
    path.write_text("default_scope = 'vdot_ext'\n"
                    "stage_order = ['prepare', 'train']\n"
                    "stages = dict(\n"
                    "    prepare=dict(call=dict(type='cheap_first_stage_for_cli_test', value=1)),\n"
                    f"    train=dict(runner={TEACHER.format(extra=extra)}))\n")
    return str(path)


def _single(tmp_path):
    path = tmp_path / 'single.py'
    path.write_text(textwrap.dedent('''
        default_scope = 'vdot_ext'
        model = dict(type='FlowMatchingPretrainer', score=dict(type='WanVACEScore', preset='tiny-vace'))
        train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                                collate_fn=dict(type='default_collate'),
                                dataset=dict(type='RandomLatentsForTest'))
        train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)
        optim_wrapper = dict(constructor='RoleOptimWrapperConstructor',
                             score=dict(optimizer=dict(type='AdamW', lr=1e-3)))
        log_processor = dict(by_epoch=False)
        default_hooks = dict(checkpoint=dict(type='VDOTCheckpointHook', interval=1, by_epoch=False))
        '''))
    return str(path)


def _exit_message(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    return str(err.value.code)


# ---------------------------------------------------------------------------
# --cfg-options
# ---------------------------------------------------------------------------
def test_unknown_cfg_options_key_is_an_error_with_close_matches(tmp_path):
    STAGE1_CALLS.clear()
    cfg = _staged(tmp_path)
    work = str(tmp_path / 'work')
    message = _exit_message([cfg, '--work-dir', work, '--cfg-options',
                             'stages.train.runner.train_cfg.max_iter=3', 'stages.prepare.call.value=2'])
    assert 'stages.train.runner.train_cfg.max_iter: no such key' in message
    assert 'did you mean stages.train.runner.train_cfg.max_iters' in message
    assert '--cfg-options-allow-new' in message
    assert 'stages.prepare.call.value' not in message      # an existing key is fine
    assert STAGE1_CALLS == [] and not osp.exists(work)


def test_cfg_options_new_keys_need_the_opt_in(tmp_path):
    cfg = _staged(tmp_path)
    work = str(tmp_path / 'work')
    # a keyword the constructor takes but the config leaves at its default is a known key ...
    STAGE1_CALLS.clear()
    main([cfg, '--work-dir', work, '--cfg-options', 'stages.train.runner.model.timestep_shift=2.0',
          '--stages', 'prepare'])
    assert STAGE1_CALLS == [1]
    # ... a misspelt one is not, and a key of no constructor needs the explicit opt-in
    message = _exit_message([cfg, '--work-dir', work, '--cfg-options',
                             'stages.train.runner.model.timestep_shfit=2.0', '--stages', 'prepare'])
    assert 'did you mean' in message and 'timestep_shfit: no such key' in message
    assert '--cfg-options-allow-new' in _exit_message([cfg, '--work-dir', work + '2', '--cfg-options',
                                                      'ablation_note=1', '--stages', 'prepare'])
    STAGE1_CALLS.clear()
    main([cfg, '--work-dir', work + '2', '--cfg-options', 'ablation_note=1',
          '--cfg-options-allow-new', '--stages', 'prepare'])
    assert STAGE1_CALLS == [1]
    # a Runner setting (here of the stage's runner) is a known key
    main([cfg, '--work-dir', work, '--cfg-options', 'stages.train.runner.experiment_name=x',
          '--stages', 'prepare'])


def test_cfg_options_values_are_parsed_by_mmengine_dictaction(tmp_path):
    from vdot_ext.tools.train import parse_args
    args = parse_args(['c.py', '--cfg-options', 'a.b=None', 'c=[1,2]', 'd=0.05', 'e=x'])
    assert args.cfg_options == {'a.b': None, 'c': [1, 2], 'd': 0.05, 'e': 'x'}


# ---------------------------------------------------------------------------
# every stage validated before stage 1 runs
# ---------------------------------------------------------------------------
def test_typo_in_a_later_stage_fails_before_the_first_stage_runs(tmp_path):
    STAGE1_CALLS.clear()
    cfg = _staged(tmp_path, extra=', timestep_shfit=3.0')
    import vdot_ext.models  # noqa: F401  (imports are not what we time)
    start = time.perf_counter()
    message = _exit_message([cfg, '--work-dir', str(tmp_path / 'work')])
    seconds = time.perf_counter() - start
    assert "stages.train.runner.model.timestep_shfit: FlowMatchingPretrainer has no keyword 'timestep_shfit'" \
        in message
    assert 'did you mean timestep_shift' in message and "'vace_drop_prob'" in message
    assert STAGE1_CALLS == [] and not osp.exists(tmp_path / 'work' / 'prepare')
    assert seconds < 5, seconds


def test_unregistered_type_and_required_value_in_a_later_stage(tmp_path):
    STAGE1_CALLS.clear()
    cfg = _staged(tmp_path)
    message = _exit_message([cfg, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                             'stages.train.runner.train_dataloader.dataset.type=RandomLatentsForTst'])
    assert 'stages.train.runner.train_dataloader.dataset.type' in message
    assert "'RandomLatentsForTst' is not registered in the vdot_ext DATASETS registry" in message
    assert 'did you mean RandomLatentsForTest' in message
    message = _exit_message([cfg, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                             'stages.train.runner.model.score.pretrained=???teacher_weights',
                             '--cfg-options-allow-new'])
    assert 'stages.train.runner.model.score.pretrained: teacher_weights' in message
    assert STAGE1_CALLS == []


# ---------------------------------------------------------------------------
# a distributed launch without a strategy
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('world_size, launcher', [('2', 'none'), ('1', 'pytorch')])
def test_no_strategy_on_several_processes_fails_at_once(tmp_path, monkeypatch, world_size, launcher):
    monkeypatch.setenv('WORLD_SIZE', world_size)
    STAGE1_CALLS.clear()
    for cfg in (_single(tmp_path), _staged(tmp_path)):
        message = _exit_message([cfg, '--work-dir', str(tmp_path / 'work'), '--launcher', launcher])
        assert 'no `strategy`' in message and 'configs/deepspeed/' in message
        assert "strategy=dict(type='RoleDeepSpeedStrategy'" in message
    assert STAGE1_CALLS == [] and not osp.exists(tmp_path / 'work')


# ---------------------------------------------------------------------------
# --resume [CHECKPOINT]
# ---------------------------------------------------------------------------
def _resumed_from(work):
    """What each run logged as its resume point, oldest run first (log folders are timestamps)."""
    logs = sorted(glob.glob(osp.join(work, '*', '*.log')))
    text = '\n'.join(open(p).read() for p in logs)
    return [line.split('resumed epoch:')[1].strip() for line in text.splitlines() if 'resumed epoch:' in line]


def test_resume_takes_a_checkpoint_path_or_the_latest(tmp_path):
    cfg = _single(tmp_path)
    work = str(tmp_path / 'work')
    main([cfg, '--work-dir', work, '--cfg-options', 'experiment_name=first'])
    assert osp.isfile(osp.join(work, 'iter_1.pth')) and osp.isfile(osp.join(work, 'iter_2.pth'))
    main([cfg, '--work-dir', work, '--resume', osp.join(work, 'iter_1.pth'),
          '--cfg-options', 'experiment_name=from_path', 'train_cfg.max_iters=3'])
    assert _resumed_from(work) == ['0, iter: 1']
    main([cfg, '--work-dir', work, '--resume', '--cfg-options', 'experiment_name=latest',
          'train_cfg.max_iters=4'])
    assert _resumed_from(work) == ['0, iter: 1', '0, iter: 3']
    message = _exit_message([cfg, '--work-dir', work, '--resume', osp.join(work, 'iter_9.pth')])
    assert 'iter_9.pth: no such file or folder' in message


def test_resume_path_and_rerun_flags_fit_the_config_kind(tmp_path):
    message = _exit_message([_staged(tmp_path), '--work-dir', str(tmp_path / 'w'), '--resume', 'x.pth'])
    assert 'staged recipe resumes each interrupted stage' in message
    message = _exit_message([_single(tmp_path), '--work-dir', str(tmp_path / 'w'), '--force-rerun', 'a'])
    assert '--force-rerun given but' in message and 'no "stages" field' in message
