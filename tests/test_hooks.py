"""Training hooks on a real mmengine Runner: the loss curves (visualizer
scalars, PNG, curve continued across a resume, rank-0 writes) and the
generator EMA (mmengine's ``momentum``, rebuilt by hand as in mmengine's
``test_averaged_model``; saved, resumed and selectable for export)."""
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.hooks import Hook
from test_resume import CrashHook, build

from vdot_ext.engine.deepspeed_strategy import free_port
from vdot_ext.engine.ema import GeneratorEMAHook, ema_file_name, ema_generator_state_dict
from vdot_ext.engine.hooks import LossCurveHook, read_loss_curves
from vdot_ext.utils import NonFiniteError, load_tensor_file, safe_torch_load, save_torch


def vis_scalars(work_dir):
    """Every record the LocalVisBackend wrote, over all runs in ``work_dir``."""
    records = []
    for root, _, names in os.walk(work_dir):
        if 'scalars.json' in names:
            with open(os.path.join(root, 'scalars.json')) as f:
                records += [json.loads(line) for line in f]
    return records


# ---------------------------------------------------------------------------
# LossCurveHook
# ---------------------------------------------------------------------------
def curve_run(work_dir, max_iters, hooks=(), **kwargs):
    return build(work_dir, max_iters, extra_hooks=[LossCurveHook(interval=1), *hooks],
                 visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]), **kwargs)


def test_loss_curve_continues_across_resume_through_the_checkpoint(tmp_path):
    straight = curve_run(tmp_path / 'straight', 4)
    straight.train()
    expected = read_loss_curves(str(tmp_path / 'straight' / 'iter_4.pth'))['loss_flow']
    assert [p[0] for p in expected] == [1, 2, 3, 4]
    work = tmp_path / 'resumed'
    crashed = curve_run(work, 4, hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = curve_run(work, 4, resume=True)
    resumed.train()
    # the checkpoint carried iterations 1-2 over the crash: the curve is whole and exact
    assert read_loss_curves(str(work / 'iter_4.pth'))['loss_flow'] == expected
    assert (work / 'loss_curve.png').stat().st_size > 0
    assert not list(work.glob('losses.json')) and not list(work.glob('*.tmp'))
    # every iteration's raw value went through mmengine's visualizer backends
    raw = {r['step']: r['iter/loss_flow'] for r in vis_scalars(work) if 'iter/loss_flow' in r}
    assert raw == {step: value for step, value in expected}


def test_load_from_starts_a_new_curve(tmp_path):
    curve_run(tmp_path / 'first', 2).train()
    second = curve_run(tmp_path / 'second', 1, load_from=str(tmp_path / 'first' / 'iter_2.pth'))
    second.train()
    hook = next(h for h in second.hooks if isinstance(h, LossCurveHook))
    assert [p[0] for p in hook.history['loss_flow']] == [1]


def _write_on_every_rank(rank, world, port, folder):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        hook = LossCurveHook()
        hook.history['loss_a'] = [[1, 0.5], [2, 0.25]]
        hook.write(os.path.join(folder, f'rank{rank}'))
        dist.barrier()
    finally:
        dist.destroy_process_group()



@pytest.mark.timeout(120)
def test_only_rank_0_writes_the_plot(tmp_path):
    mp.start_processes(_write_on_every_rank, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method='fork')
    assert (tmp_path / 'rank0' / 'loss_curve.png').is_file()
    assert not (tmp_path / 'rank1').exists()


# ---------------------------------------------------------------------------
# GeneratorEMAHook
# ---------------------------------------------------------------------------
class RecordScore(Hook):
    """The score network's parameters after every iteration."""

    def __init__(self):
        self.seen = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.seen.append({n: p.detach().clone() for n, p in runner.model.score.named_parameters()})


def expected_ema(history, momentum, begin_iter=0):
    """mmengine test_averaged_model::test_ema, written out: the first update
    (and those before begin_iter) copy, then ema·(1 − m) + θ·m."""
    ema = None
    for i, params in enumerate(history):
        if ema is None or i + 1 < begin_iter:
            ema = {n: p.clone() for n, p in params.items()}
        else:
            ema = {n: ema[n] * (1 - momentum) + params[n] * momentum for n in params}
    return ema


def ema_run(work_dir, max_iters, momentum=0.25, begin_iter=0, hooks=(), **kwargs):
    ema = GeneratorEMAHook(momentum=momentum, module='score', begin_iter=begin_iter)
    record = RecordScore()
    runner = build(work_dir, max_iters, extra_hooks=[ema, record, *hooks], **kwargs)
    return runner, ema, record


@pytest.mark.parametrize('begin_iter', [0, 3])
def test_ema_equals_the_average_rebuilt_by_hand(tmp_path, begin_iter):
    runner, ema, record = ema_run(tmp_path, 4, begin_iter=begin_iter)
    runner.train()
    expected = expected_ema(record.seen, 0.25, begin_iter)
    got = ema.full_state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert ema.steps == 4
    # not the live weights: the average really lags
    assert any(not torch.equal(got[n], record.seen[-1][n]) for n in got)
    # saved: in the checkpoint (mmengine's key) and beside the final weights
    state = safe_torch_load(str(tmp_path / 'iter_4.pth'))
    assert state['meta']['ema'] == dict(module='score', momentum=0.25, steps=4)
    for name in expected:
        assert torch.equal(state['ema_state_dict'][name], got[name])
    final = load_tensor_file(str(tmp_path / ema_file_name('score')))
    assert final.keys() == got.keys() and all(torch.equal(final[n], got[n]) for n in got)
    # selectable for export / evaluation: the score's state dict with the EMA in it
    selected = ema_generator_state_dict(str(tmp_path / 'iter_4.pth'))
    assert selected.keys() == runner.model.score.state_dict().keys()
    assert all(torch.equal(selected[n], got[n]) for n in got)
    from_file = ema_generator_state_dict(str(tmp_path / ema_file_name('score')))
    assert all(torch.equal(from_file[n], got[n]) for n in got)
    runner.model.score.load_state_dict(selected)


def test_ema_resumes_exactly_and_load_from_starts_a_new_average(tmp_path):
    straight, straight_ema, _ = ema_run(tmp_path / 'straight', 4)
    straight.train()
    crashed, _, _ = ema_run(tmp_path / 'run', 4, hooks=[CrashHook(2)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed, resumed_ema, _ = ema_run(tmp_path / 'run', 4, resume=True)
    resumed.train()
    assert resumed_ema.steps == 4
    want = straight_ema.full_state_dict()
    got = resumed_ema.full_state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
    # load_from is a new run: the EMA starts from its own first update
    fresh, fresh_ema, record = ema_run(tmp_path / 'fresh', 1, load_from=str(tmp_path / 'run' / 'iter_4.pth'))
    fresh.train()
    assert fresh_ema.steps == 1
    got = fresh_ema.full_state_dict()
    assert all(torch.equal(got[n], record.seen[0][n]) for n in got)


def test_ema_arguments_and_errors(tmp_path):
    with pytest.warns(DeprecationWarning, match='momentum = 1 - decay'):
        assert GeneratorEMAHook(decay=0.9).momentum == pytest.approx(0.1)
    with pytest.raises(ValueError, match='not both'):
        GeneratorEMAHook(momentum=0.1, decay=0.9)
    with pytest.raises(ValueError, match=r'momentum must be in \(0, 1\]'):
        GeneratorEMAHook(momentum=0.0)
    bad = tmp_path / 'bad.pth'
    save_torch({'state_dict': {'generator.w': torch.zeros(2)},
                'ema_state_dict': {'w': torch.tensor([1.0, float('nan')])}}, str(bad))
    with pytest.raises(NonFiniteError, match='bad.pth'):
        ema_generator_state_dict(str(bad))
    save_torch({'state_dict': {'generator.w': torch.zeros(2)}}, str(bad))
    with pytest.raises(KeyError, match="bad.pth: no 'ema_state_dict'"):
        ema_generator_state_dict(str(bad))
    save_torch({'state_dict': {'generator.w': torch.zeros(2)}, 'ema_state_dict': {'v': torch.zeros(2)}},
               str(bad))
    with pytest.raises(KeyError, match=r"\['v'\] are not in model.generator"):
        ema_generator_state_dict(str(bad))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        GeneratorEMAHook(momentum=0.5)
