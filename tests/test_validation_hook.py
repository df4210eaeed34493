"""ValidationHook on a real mmengine Runner training a tiny VDOTDistiller on synthetic VCUs:

* a run with the hook ends with the same weights, to the last bit, as a run without it (and would not
  if the hook left the global RNG where sampling put it);
* every N iterations it writes ``validation/iter_<k>/`` (mp4 per held-out sample, frame strip, metrics)
  and sends the metrics and the strip to the visualizer's backends;
* the same weights give the same metrics (same held-out VCUs, same seeded noise), on rank 0 only.
"""
import json
import os
import os.path as osp

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.runner import Runner

from vdot_ext.engine.deepspeed_strategy import free_port
from vdot_ext.engine.validation_hook import METRICS_FILE, ValidationHook, held_out_indices, read_validation_history

TASKS = ('t2v', 'r2v', 'v2v_gray', 'mv2v_outpaint')


@pytest.fixture(scope='module')
def codecs(tmp_path_factory):
    """An untrained tiny VAE and text encoder (the hook only needs them to decode and to encode)."""
    from vdot_ext.data.synthetic_videos import caption_vocabulary
    from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE
    folder = tmp_path_factory.mktemp('codecs')
    vae = TinyWanVAE(dim=8).save(str(folder / 'vae.pth'))
    text = TinyTextEncoder(caption_vocabulary(), dim=32, dim_attn=32, dim_ffn=64).save(str(folder / 'text.pth'))
    return dict(vae=vae, text=text, data_root=str(folder / 'data'))


def dataset_cfg(codecs, num_samples, seed):
    return dict(type='SyntheticVideoDataset', num_samples=num_samples, tasks=TASKS, num_frames=5, height=32,
                width=32, seed=seed, data_root=codecs['data_root'], vae_checkpoint=codecs['vae'],
                text_encoder_checkpoint=codecs['text'], write_files=False)


def distiller_cfg():
    return dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'),
                discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 2, 3), bottleneck_dim=24,
                                   num_heads=2, use_time_emb=True),
                otd_loss=dict(type='OTDLoss', epsilon=0.1, num_iters=10, pool_kernel=2, normalize='none'),
                dmd_loss=dict(type='DMDLoss'), gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
                gen_every=2, guidance_scale=3.0, uncond='zeros', use_vace_context=True)


def role_optimizers():
    opt = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999)))
    return dict(constructor='RoleOptimWrapperConstructor', generator=opt, critic=opt)


def runner(work_dir, codecs, max_iters, hooks=()):
    return Runner(
        model=distiller_cfg(), work_dir=str(work_dir), experiment_name=f'run_{osp.basename(str(work_dir))}',
        train_dataloader=dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                              batch_sampler=dict(type='ShapeGroupedBatchSampler'),
                              collate_fn=dict(type='default_collate'),
                              dataset=dataset_cfg(codecs, num_samples=4, seed=0)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters), optim_wrapper=role_optimizers(),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=100), checkpoint=None),
        custom_hooks=list(hooks), default_scope='vdot_ext', randomness=dict(seed=0), log_level='WARNING',
        log_processor=dict(by_epoch=False),
        visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]))


def hook_cfg(codecs, **kwargs):
    return dict(dict(type='ValidationHook', dataset=dataset_cfg(codecs, num_samples=4, seed=99),
                     vae_checkpoint=codecs['vae'], interval=2, samples_per_task=1), **kwargs)


def weights(r):
    return {k: v.detach().clone() for k, v in r.model.state_dict().items()}


def vis_records(work_dir):
    records = []
    for root, _, names in os.walk(work_dir):
        if 'scalars.json' in names:
            with open(osp.join(root, 'scalars.json')) as f:
                records += [json.loads(line) for line in f]
    return records


@pytest.mark.timeout(600)
def test_hook_writes_validations_and_leaves_training_bit_identical(tmp_path, codecs):
    plain = runner(tmp_path / 'plain', codecs, max_iters=3)
    plain.train()
    expected = weights(plain)

    validated = runner(tmp_path / 'validated', codecs, max_iters=3, hooks=[hook_cfg(codecs)])
    validated.train()
    got = weights(validated)
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f'the hook changed training: {len(differ)} tensors differ, e.g. {differ[:3]}'

    # iteration 0 (the initialisation), every 2 iterations, and the last one
    work = tmp_path / 'validated'
    history = read_validation_history(str(work))
    assert sorted(history) == [0, 2, 3]
    for k, summary in history.items():
        folder = work / 'validation' / f'iter_{k}'
        assert summary['iteration'] == k and summary['samples'] == len(TASKS)
        assert set(summary['metrics']) == set(TASKS)
        assert 'kept_psnr' in summary['metrics']['mv2v_outpaint']
        assert 'luma_psnr' in summary['metrics']['v2v_gray']
        assert 'ref_colour_recall' in summary['metrics']['r2v']
        assert len(list(folder.glob('*.mp4'))) == len(TASKS)
        assert (folder / 'frames.png').stat().st_size > 0
    assert not list((work / 'validation').glob('.*')), 'temporary folders left behind'
    # the student changed between the start and the end, and the metrics say so
    assert history[0]['metrics'] != history[3]['metrics']

    # the visualizer's backends got the scalars and the frame strip of every validation
    steps = {r['step']: r for r in vis_records(str(work)) if 'val/mv2v_outpaint/kept_psnr' in r}
    assert sorted(steps) == [0, 2, 3]
    assert steps[2]['val/mv2v_outpaint/kept_psnr'] == pytest.approx(history[2]['metrics']['mv2v_outpaint']
                                                                    ['kept_psnr'])
    images = {name for root, _, names in os.walk(work) for name in names if name.startswith('validation_frames')}
    assert images == {f'validation_frames_{k}.png' for k in (0, 2, 3)}

    # same weights, same held-out VCUs and noise: the same metrics, every time
    hook = next(h for h in validated.hooks if isinstance(h, ValidationHook))
    again = hook.validate(validated, 3)
    assert again['metrics'] == history[3]['metrics']
    assert again['per_sample'] == history[3]['per_sample']


@pytest.mark.timeout(300)
def test_validation_restores_every_rng_stream_and_module_mode(tmp_path, codecs):
    """The hook's sampling draws from the global RNG (the few-step sampler's re-noising): without the
    save/restore the next training draw would differ."""
    import random

    import numpy as np
    r = runner(tmp_path / 'r', codecs, max_iters=0, hooks=[hook_cfg(codecs, at_start=False)])
    r.train()
    hook = next(h for h in r.hooks if isinstance(h, ValidationHook))
    model = r.model
    model.train()
    model.real_score.eval()
    modes = {n: m.training for n, m in model.named_modules()}

    def seeded_draws(between=None):
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        if between is not None:
            between()
        return torch.rand(3), random.random(), float(np.random.rand())

    expected = seeded_draws()
    after = seeded_draws(lambda: hook.validate(r, 1))
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_held_out_indices_and_arguments(codecs):
    from vdot_ext.registry import DATASETS
    data = DATASETS.build(dataset_cfg(codecs, num_samples=9, seed=99))
    # the first samples of each task, in index order (sample i has task i % 4), sorted by task
    assert held_out_indices(data, 2) == [('mv2v_outpaint', 3), ('mv2v_outpaint', 7), ('r2v', 1), ('r2v', 5),
                                         ('t2v', 0), ('t2v', 4), ('v2v_gray', 2), ('v2v_gray', 6)]
    with pytest.raises(ValueError, match='interval'):
        ValidationHook(dataset={}, vae_checkpoint='x', interval=0)
    with pytest.raises(ValueError, match='image_name'):
        ValidationHook(dataset={}, vae_checkpoint='x', image_name='val/frames')


def _validate_on_rank(rank, world, port, folder, codecs):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        r = runner(osp.join(folder, f'rank{rank}'), codecs, max_iters=0,
                   hooks=[hook_cfg(codecs, at_start=False)])
        hook = next(h for h in r.hooks if isinstance(h, ValidationHook))
        result = hook.validate(r, 3)
        assert (result is None) == (rank != 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()



@pytest.mark.timeout(300)
def test_only_rank_0_validates_and_writes(tmp_path, codecs):
    mp.start_processes(_validate_on_rank, args=(2, free_port(), str(tmp_path), codecs), nprocs=2,
                       start_method='fork')
    assert (tmp_path / 'rank0' / 'validation' / 'iter_3' / METRICS_FILE).is_file()
    assert not (tmp_path / 'rank1' / 'validation').exists()
