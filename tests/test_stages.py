"""The stage driver: validation errors, {work_dir} substitution, skip of finished
stages, and resume of an interrupted training stage from its checkpoint."""
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from torch.utils.data import Dataset

from vdot_ext.engine.compat import enable_trusted_local_checkpoints
from vdot_ext.engine.config_checks import check_required_fields
from vdot_ext.engine.stages import run_stages, validate_stages
from vdot_ext.registry import DATASETS, FUNCTIONS

CALLS = []


@FUNCTIONS.register_module(name='record_call_for_test', force=True)
def record_call_for_test(work_dir, path, value):
    CALLS.append((work_dir, path, value))
    return dict(path=path)


@DATASETS.register_module(name='RandomLatentsForTest', force=True)
class RandomLatentsForTest(Dataset):
    """Fixed random tensors shaped like a VCU sample (T2V, 3 latent frames)."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.items = [dict(context=torch.randn(6, 32, generator=g),
                           latents=torch.randn(16, 3, 8, 8, generator=g),
                           vace_context=torch.randn(96, 3, 8, 8, generator=g))
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _cfg(stages, order=None):
    cfg = dict(default_scope='vdot_ext', stages=stages,
               log_processor=dict(by_epoch=False),
               default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2,
                                                  by_epoch=False)),
               custom_hooks=[dict(type='LossCurveHook', interval=1)])
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


def test_required_marker_is_reported_with_its_path():
    cfg = Config(dict(model=dict(score=dict(pretrained='??? the weights')),
                      data=['ok', '??? a manifest']))
    with pytest.raises(ValueError) as err:
        check_required_fields(cfg, 'c.py')
    assert 'model.score.pretrained: the weights' in str(err.value)
    assert 'data.1: a manifest' in str(err.value)


def test_function_stages_substitute_and_skip_when_done(tmp_path):
    CALLS.clear()
    cfg = _cfg(dict(prep=dict(call=dict(type='record_call_for_test',
                                        path='{work_dir}/prep/out.bin', value=3))))
    out = run_stages(cfg, str(tmp_path))
    assert CALLS == [(str(tmp_path / 'prep'), f'{tmp_path}/prep/out.bin', 3)]
    assert out['prep']['path'] == f'{tmp_path}/prep/out.bin'
    done = json.loads((tmp_path / 'prep' / 'stage_done.json').read_text())
    assert done['path'] == out['prep']['path']
    run_stages(cfg, str(tmp_path))          # finished: skipped
    assert len(CALLS) == 1


def test_interrupted_training_stage_resumes_from_checkpoint(tmp_path):
    enable_trusted_local_checkpoints()
    run_stages(_cfg(dict(teacher=_teacher_stage(4))), str(tmp_path))
    stage_dir = tmp_path / 'teacher'
    first = torch.load(stage_dir / 'final_model.pth', weights_only=False)
    assert first['meta']['iter'] == 4
    # pretend the run died after its iteration-4 checkpoint, with a longer plan
    (stage_dir / 'stage_done.json').unlink()
    (stage_dir / 'final_model.pth').unlink()
    out = run_stages(_cfg(dict(teacher=_teacher_stage(6))), str(tmp_path))
    assert out['teacher']['iterations'] == 6
    logs = sorted(stage_dir.glob('*/*.log'))
    assert any('resumed' in p.read_text().lower() for p in logs), logs
    assert osp.isfile(stage_dir / 'iter_6.pth')
    # the loss curve keeps the points from before the interruption
    curve = json.loads((stage_dir / 'losses.json').read_text())['loss_flow']
    assert [int(p[0]) for p in curve] == [1, 2, 3, 4, 5, 6]
