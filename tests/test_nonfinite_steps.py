"""Non-finite steps never reach the weights (docs/DESIGN.md §11).

Every role of ``VDOTDistiller`` and ``FlowMatchingPretrainer`` steps through
``NonFiniteGuard``: a NaN/Inf loss or gradient skips the update, is counted in buffers,
logged with the batch's sample ids, and ends the run after ``max_consecutive_nonfinite``
skips in a row.
"""
import glob
import logging
import os.path as osp

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.optim import OptimWrapper
from mmengine.runner import Runner
from torch.utils.data import Dataset

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.registry import DATASETS, MODELS

B, F, H, W, L = 2, 3, 8, 8, 6
IDS = ['clip_a.mp4', 'clip_b.mp4']


def build_optim(model, lr=1e-3, **wrapper_kw):
    role = dict(type='OptimWrapper',
                optimizer=dict(type='AdamW', lr=lr, betas=(0.0, 0.999), weight_decay=0.0),
                **wrapper_kw)
    return RoleOptimWrapperConstructor(
        {name: dict(role) for name in model.trainable_roles()})(model)


def stage1_distiller(**overrides):
    """Stage-1 setup: tiny T2V teacher, DMD + denoising critic, OTD and GAN off."""
    cfg = dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny'),
               discriminator=None, gan_loss=None, otd_loss=None, dmd_loss=dict(type='DMDLoss'),
               use_vace_context=False, gen_every=1, guidance_scale=2.0, uncond='zeros', seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def stage2_distiller(**overrides):
    """Stage-2 setup: VACE teacher, OTD + DMD / GAN with the register-token discriminator."""
    cfg = dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'),
               discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3),
                                  bottleneck_dim=24, num_heads=2, use_time_emb=True),
               otd_loss=dict(type='OTDLoss', epsilon=0.1, num_iters=20, pool_kernel=2, normalize='none'),
               dmd_loss=dict(type='DMDLoss'),
               gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
               gen_every=1, guidance_scale=2.0, uncond='zeros', seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def pretrainer(**overrides):
    cfg = dict(type='FlowMatchingPretrainer', score=dict(type='WanVACEScore', preset='tiny'),
               text_drop_prob=0.0, vace_drop_prob=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def batch(vace=True, seed=1, nan=None):
    """A batch with sample ids; ``nan=(key, row)`` puts a NaN into one sample."""
    g = torch.Generator().manual_seed(seed)
    data = dict(context=torch.randn(B, L, 32, generator=g),
                latents=torch.randn(B, 16, F, H, W, generator=g), sample_id=list(IDS))
    if vace:
        data['vace_context'] = torch.randn(B, 96, F, H, W, generator=g)
    if nan is not None:
        key, row = nan
        data[key][row].view(-1)[0] = float('nan')
    return data


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before, what):
    now = module.state_dict()
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f'{what}: a skipped step changed {changed[:3]}'


def assert_finite_and_changed(module, before, what):
    now = module.state_dict()
    assert all(torch.isfinite(v).all() for v in now.values() if v.is_floating_point()), what
    assert any(not torch.equal(now[k], before[k]) for k in before), f'{what} did not train'


@pytest.fixture
def warnings_log():
    """The mmengine warnings emitted during the test."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ----------------------------------------------------------------------
# VDOTDistiller
# ----------------------------------------------------------------------
def test_stage1_nan_context_is_skipped_and_training_continues(warnings_log):
    """Today a NaN in one sample's context turns every generator and fake-score weight NaN."""
    model = stage1_distiller()
    optim = build_optim(model)
    gen, fake, teacher = state(model.generator), state(model.fake_score), state(model.real_score)

    log = model.train_step(batch(vace=False, nan=('context', 1)), optim)

    assert_unchanged(model.generator, gen, 'generator')
    assert_unchanged(model.fake_score, fake, 'fake_score')
    assert_unchanged(model.real_score, teacher, 'real_score')
    assert float(log['nonfinite_skips_generator']) == 1.0
    assert float(log['nonfinite_skips_critic']) == 1.0
    assert all(torch.isfinite(v).all() for v in log.values())   # no NaN reaches the logger
    assert 'loss_gen_dmd' not in log and 'loss_critic_denoise' not in log
    assert model.nonfinite_guard.consecutive('generator') == 1
    assert int(model.iteration) == 1       # the schedule advances over a skipped iteration
    # the warnings name the role, the iteration, the reason and the batch's samples
    gen_msg = next(m for m in warnings_log if 'skipped the generator step' in m)
    assert 'iteration 0' in gen_msg and 'DMDLoss' in gen_msg and 'NonFiniteError' in gen_msg
    assert str(IDS) in gen_msg and f"context of samples ['1:{IDS[1]}']" in gen_msg
    assert any('skipped the critic step' in m for m in warnings_log)

    # clean batches: both roles train again and the consecutive counts reset
    for seed in (2, 3):
        log = model.train_step(batch(vace=False, seed=seed), optim)
    assert_finite_and_changed(model.generator, gen, 'generator')
    assert_finite_and_changed(model.fake_score, fake, 'fake_score')
    assert {'loss_gen_dmd', 'loss_critic_denoise'} <= set(log)
    assert model.nonfinite_guard.skips('generator') == 1
    assert model.nonfinite_guard.consecutive('generator') == 0
    assert model.nonfinite_guard.consecutive('critic') == 0


def test_gan_nan_latent_leaves_discriminator_unchanged():
    """Today a NaN real latent poisons the discriminator (and the GAN generator step)."""
    model = stage2_distiller()
    optim = build_optim(model)
    model.iteration.fill_(1)     # odd k: adversarial iteration (generator and discriminator GAN)
    roles = dict(generator=model.generator, fake_score=model.fake_score,
                 discriminator=model.discriminator)
    before = {name: state(m) for name, m in roles.items()}
    log = model.train_step(batch(nan=('latents', 0)), optim)
    assert model.schedule_trace[-1].critic == 'gan' and model.schedule_trace[-1].generator == 'gan'
    for name, module in roles.items():
        assert_unchanged(module, before[name], name)
    assert float(log['nonfinite_skips_critic']) == 1.0
    assert float(log['nonfinite_skips_generator']) == 1.0
    # the next adversarial iteration with clean data trains the discriminator
    model.iteration.fill_(3)
    model.train_step(batch(seed=5), optim)
    assert_finite_and_changed(model.discriminator, before['discriminator'], 'discriminator')


def test_otd_on_nan_context_is_skipped_and_blames_the_batch(warnings_log):
    """With OTD on, a NaN batch is a counted skip naming the batch, not a solver crash."""
    model = stage2_distiller()
    optim = build_optim(model)
    gen = state(model.generator)
    log = model.train_step(batch(nan=('context', 1)), optim)      # k = 0: OTD + DMD step
    assert model.schedule_trace[-1].generator == 'dm'
    assert_unchanged(model.generator, gen, 'generator')
    assert float(log['nonfinite_skips_generator']) == 1.0
    msg = next(m for m in warnings_log if 'skipped the generator step' in m)
    assert 'NonFiniteError' in msg and IDS[1] in msg


def test_consecutive_limit_raises_with_role_count_and_ids():
    model = stage1_distiller(max_consecutive_nonfinite=2)
    optim = build_optim(model)
    bad = batch(vace=False, nan=('context', 0))
    # a clean step in between resets the run of skips
    model.train_step(bad, optim)
    model.train_step(batch(vace=False), optim)
    model.train_step(bad, optim)
    with pytest.raises(RuntimeError) as info:
        model.train_step(bad, optim)
    msg = str(info.value)
    assert "generator step was skipped 2 times in a row" in msg
    assert 'max_consecutive_nonfinite=2' in msg and IDS[0] in msg
    # nothing is left requiring grad after the error
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match='max_consecutive_nonfinite'):
        stage1_distiller(max_consecutive_nonfinite=0)


def test_skip_counters_survive_resume():
    """The counters are buffers: a resumed model keeps totals and the run of skips."""
    model = stage1_distiller(max_consecutive_nonfinite=2)
    model.train_step(batch(vace=False, nan=('context', 0)), build_optim(model))
    sd = model.state_dict()
    assert int(sd['nonfinite_guard.skips_generator']) == 1
    assert int(sd['nonfinite_guard.consecutive_critic']) == 1
    resumed = stage1_distiller(max_consecutive_nonfinite=2)
    resumed.load_state_dict(sd)
    assert resumed.nonfinite_guard.skips('generator') == 1
    with pytest.raises(RuntimeError, match='skipped 2 times in a row'):
        resumed.train_step(batch(vace=False, nan=('context', 0)), build_optim(resumed))


def test_nonfinite_gradient_is_skipped_and_named(warnings_log):
    """A finite loss with a non-finite gradient (here injected by a gradient hook) never steps;
    with clip_grad on, mmengine's clipping would otherwise spread it to every weight."""
    model = stage1_distiller(gen_every=2)
    optim = build_optim(model, clip_grad=dict(max_norm=1.0))
    weight = model.fake_score.dit.head.head.weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float('inf')))
    fake = state(model.fake_score)
    log = model.train_step(batch(vace=False), optim)
    handle.remove()
    assert_unchanged(model.fake_score, fake, 'fake_score')
    assert float(log['nonfinite_skips_critic']) == 1.0
    msg = next(m for m in warnings_log if 'skipped the critic step' in m)
    assert 'fake_score.dit.head.head.weight' in msg
    # the discarded gradients do not leak into the next step
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.fake_score.parameters())
    model.train_step(batch(vace=False, seed=4), optim)
    assert_finite_and_changed(model.fake_score, fake, 'fake_score')


# ----------------------------------------------------------------------
# FlowMatchingPretrainer
# ----------------------------------------------------------------------
def test_pretrainer_nan_latent_skipped_then_limit(warnings_log):
    model = pretrainer(max_consecutive_nonfinite=2)
    optim = build_optim(model)
    before = state(model.score)
    log = model.train_step(batch(vace=False, nan=('latents', 1)), optim)
    assert_unchanged(model.score, before, 'score')
    assert float(log['nonfinite_skips_score']) == 1.0 and 'loss_flow' not in log
    assert any('skipped the score step' in m and IDS[1] in m for m in warnings_log)
    log = model.train_step(batch(vace=False), optim)
    assert_finite_and_changed(model.score, before, 'score')
    assert 'loss_flow' in log and model.nonfinite_guard.consecutive('score') == 0
    model.train_step(batch(vace=False, nan=('latents', 0)), optim)
    with pytest.raises(RuntimeError, match=r"score step was skipped 2 times in a row.*clip_a"):
        model.train_step(batch(vace=False, nan=('context', 0)), optim)


def test_accumulation_skipped_batch_is_as_if_not_drawn():
    """accumulative_counts=2: a skipped micro-batch runs no backward and does not count, so
    the window is [clean 1, clean 2] and the update equals a run that never saw the bad batch."""
    def run(batches):
        model = pretrainer()
        wrapper = OptimWrapper(torch.optim.AdamW(model.score.parameters(), lr=1e-3),
                               accumulative_counts=2)
        for seed, data in batches:
            torch.manual_seed(seed)         # the same t and noise for the same batch
            model.train_step(data, wrapper)
        return model, wrapper

    clean1, clean2 = batch(vace=False, seed=1), batch(vace=False, seed=2)
    bad = batch(vace=False, seed=3, nan=('latents', 0))
    guarded, w1 = run([(10, clean1), (11, bad), (12, clean2)])
    reference, w2 = run([(10, clean1), (12, clean2)])
    assert w1._inner_count == w2._inner_count == 2
    assert guarded.nonfinite_guard.skips('score') == 1
    before = state(pretrainer().score)
    assert_finite_and_changed(guarded.score, before, 'score')     # the window stepped
    for key, value in reference.score.state_dict().items():
        torch.testing.assert_close(guarded.score.state_dict()[key], value, rtol=0, atol=0)


class CPUAmpOptimWrapper(OptimWrapper):
    """mmengine's ``AmpOptimWrapper`` backward/step (dynamic loss scaling with a torch
    ``GradScaler``) on CPU; mmengine's class itself refuses to build without CUDA."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loss_scaler = torch.amp.GradScaler('cpu')

    def backward(self, loss, **kwargs):
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs):
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()


def test_loss_scaler_backs_off_on_a_skipped_overflow():
    """With dynamic loss scaling, a skipped non-finite gradient lowers the scale as
    GradScaler.step/update would have; the next clean step runs normally."""
    model = pretrainer()
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.AdamW(model.score.parameters(), lr=1e-3),
                                 clip_grad=dict(max_norm=1.0))
    before = state(model.score)
    handle = model.score.dit.head.head.weight.register_hook(lambda g: g * float('inf'))
    model.train_step(batch(vace=False), wrapper)
    handle.remove()
    assert_unchanged(model.score, before, 'score')
    assert wrapper.loss_scaler.get_scale() == 2.0 ** 15
    model.train_step(batch(vace=False, seed=2), wrapper)
    assert_finite_and_changed(model.score, before, 'score')
    assert model.nonfinite_guard.skips('score') == 1


def _two_rank_worker(rank, port, out_dir):
    """One rank: rank 1's batch holds a NaN; both ranks must skip the same step."""
    import json
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                                         rank=rank, world_size=2)
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    MMLogger.get_current_instance().addHandler(Collect(level=logging.WARNING))
    model = pretrainer()
    wrapper = OptimWrapper(torch.optim.AdamW(model.score.parameters(), lr=1e-3))
    before = state(model.score)
    data = batch(vace=False, seed=rank, nan=('latents', 1) if rank == 1 else None)
    data['sample_id'] = [f'rank{rank}_{i}' for i in range(B)]
    log = model.train_step(data, wrapper)
    unchanged = all(torch.equal(v, model.score.state_dict()[k]) for k, v in before.items())
    model.train_step(batch(vace=False, seed=10 + rank), wrapper)
    stepped = any(not torch.equal(v, model.score.state_dict()[k]) for k, v in before.items())
    with open(osp.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(dict(unchanged=unchanged, stepped=stepped, records=records,
                       skips=float(log['nonfinite_skips_score'])), f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_skip_together_and_the_log_names_every_rank_batch(tmp_path):
    """A NaN on one rank skips the step on every rank (no rank runs backward/step alone)."""
    import json
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2,
                                          join=True, start_method='fork')
    results = [json.load(open(tmp_path / f'rank{r}.json')) for r in range(2)]
    for rank, result in enumerate(results):
        assert result['unchanged'] and result['skips'] == 1.0, rank     # rank 0's batch was clean
        assert result['stepped'], rank
    msg = next(m for m in results[0]['records'] if 'skipped the score step' in m)
    assert 'non-finite loss on another rank' in msg
    assert "rank 1: sample_id=['rank1_0', 'rank1_1']" in msg and "latents of samples ['1:rank1_1']" in msg


# ----------------------------------------------------------------------
# through a real mmengine Runner
# ----------------------------------------------------------------------
@DATASETS.register_module(name='NaNSampleDatasetForTest', force=True)
class NaNSampleDatasetForTest(Dataset):
    """Four clips with string sample ids; clip 1's latents hold a NaN."""

    def __init__(self, n=4, bad=1):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            item = dict(context=torch.randn(L, 32, generator=g),
                        latents=torch.randn(16, F, H, W, generator=g),
                        sample_id=f'videos/clip_{i:03d}.mp4', index=i)
            if i == bad:
                item['latents'][0, 0, 0, 0] = float('nan')
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def runner_cfg(work_dir, max_iters):
    return dict(
        default_scope='vdot_ext',
        work_dir=str(work_dir),
        model=dict(type='FlowMatchingPretrainer', score=dict(type='WanVACEScore', preset='tiny'),
                   text_drop_prob=0.0, vace_drop_prob=0.0),
        train_dataloader=dict(batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate'),
                              dataset=dict(type='NaNSampleDatasetForTest')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=dict(constructor='RoleOptimWrapperConstructor',
                           score=dict(type='OptimWrapper',
                                      optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.0),
                                      clip_grad=dict(max_norm=1.0))),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1), checkpoint=None),
        log_processor=dict(by_epoch=False, window_size=1),
        randomness=dict(seed=0), launcher='none')


def test_runner_logs_the_skip_with_sample_ids(tmp_path):
    runner = Runner.from_cfg(runner_cfg(tmp_path, max_iters=2))
    runner.train()
    assert runner.iter == 2                       # the run went on after the bad batch
    model = runner.model
    assert model.nonfinite_guard.skips('score') == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert runner.message_hub.get_scalar('train/nonfinite_skips_score').current() == 1.0
    log_text = open(glob.glob(osp.join(str(tmp_path), '*', '*.log'))[0]).read()
    skip_line = next(line for line in log_text.splitlines() if 'skipped the score step' in line)
    # iteration 0 is the batch [clip_000, clip_001]; clip_001 holds the NaN
    assert 'iteration 0' in skip_line
    assert "sample_id=['videos/clip_000.mp4', 'videos/clip_001.mp4']" in skip_line
    assert "latents of samples ['1:videos/clip_001.mp4']" in skip_line
    assert 'nonfinite_skips_score: 1.0000' in log_text
