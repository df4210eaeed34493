"""Export to the Wan2.1 / VACE release layout: files, round trip, real-size layout
== diffsynth's official entries, LoRA merge, EMA, atomicity, the CLI, and
diffsynth's own WanVideoPipeline loading the export and producing our latents."""
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from real_layout import release_state_dict, write_image, write_video, write_wan_release_folder
from safetensors.torch import save_file

from vdot_ext.apis import export as E
from vdot_ext.apis.student import load_student
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.utils import NonFiniteError


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    return write_wan_release_folder(str(tmp_path_factory.mktemp('Wan2.1-VACE-tiny')))


@pytest.fixture(scope='module')
def exported(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('exports') / 'student')
    result = E.export_generator(release['model'], out, max_shard_size='60KB')
    return result


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f'{k}: {m}')


def test_layout_index_config_and_round_trip(release, exported):
    out = exported.out_dir
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith('.safetensors')]
    assert len(shards) == len(exported.shards) > 1
    assert all(n == E.SHARD_PATTERN.format(index=i + 1, total=len(shards)) for i, n in enumerate(shards))
    assert set(names) == set(shards) | {E.INDEX_NAME, E.CONFIG_NAME, E.STUDENT_NAME}
    index = json.load(open(osp.join(out, E.INDEX_NAME)))
    expected = release_state_dict(release['model'])
    assert set(index['weight_map']) == set(expected)          # release keys, no dit./vace. prefix
    assert index['metadata']['total_size'] == sum(v.numel() * v.element_size() for v in expected.values())
    config = json.load(open(osp.join(out, E.CONFIG_NAME)))
    assert config['_class_name'] == 'VaceWanModel' and config['model_type'] == 'vace'
    assert config['vace_layers'] == [0, 2] and config['dim'] == 48 and config['num_heads'] == 2
    student = json.load(open(osp.join(out, E.STUDENT_NAME)))
    assert student['sampler'] == E.DEFAULT_SAMPLER and student['ema'] is False
    # every tensor comes back exactly, through diffsynth's loader + converters
    reread = WanVACEScore(**E.read_release_config(out), pretrained=E.export_files(out))
    _assert_same(release_state_dict(reread), expected)
    loaded = load_student(out)
    assert loaded.arch_from == 'config.json'
    _assert_same(release_state_dict(loaded.model), expected)


@pytest.mark.parametrize('preset', ['wan2.1-t2v-1.3b', 'wan2.1-vace-1.3b', 'wan2.1-t2v-14b', 'wan2.1-vace-14b'])
def test_real_size_export_is_the_official_layout(preset):
    """The keys and shapes an export writes at the real sizes hash (diffsynth's
    hash_model_file rule) to diffsynth's entries for the official releases, so
    ModelConfig(path=...) loads an export with no registration."""
    from diffsynth.configs import MODEL_CONFIGS
    model = WanVACEScore(preset, device='meta')
    entries = E._module_entries(model, None)
    digest = E.diffsynth_hash({e.key: e.shape for e in entries})
    names = sorted(c['model_name'] for c in MODEL_CONFIGS if c['model_hash'] == digest)
    assert names == (['wan_video_dit', 'wan_video_vace'] if 'vace' in preset else ['wan_video_dit'])
    config = E.release_config(model.arch)
    official = [c for c in MODEL_CONFIGS if c['model_hash'] == digest and c['model_name'] == 'wan_video_dit'][0]
    for key in ('dim', 'ffn_dim', 'num_heads', 'num_layers', 'freq_dim', 'text_dim', 'in_dim', 'out_dim'):
        assert config[key] == official['extra_kwargs'][key], key


def _pil_inputs(pixels):
    from PIL import Image
    frames = [Image.fromarray(f) for f in pixels.frames]
    masks = [Image.fromarray(np.repeat(m.astype(np.uint8)[..., None] * 255, 3, axis=-1)) for m in pixels.masks]
    ref = pixels.ref_images[:, 0].permute(1, 2, 0).numpy()
    ref = Image.fromarray(np.round((ref + 1) * 127.5).astype(np.uint8))
    return frames, masks, ref


def test_diffsynth_pipeline_loads_the_export_and_gives_our_latents(release, exported, tmp_path):
    """diffsynth's WanVideoPipeline.from_pretrained(ModelConfig(path=shards)) loads
    the exported tiny student (DiT + VACE via diffsynth's converters) and the tiny
    umT5; with the student's scheduler (DiffSynthRenoiseScheduler) it produces
    our inference's latents and video from the same seed.

    What needs help: diffsynth finds a model's class by the md5 of its keys and
    shapes in MODEL_CONFIGS, which lists only release sizes, so the tiny files get
    entries (register_with_diffsynth; real sizes need none, test above). Its
    WanVideoVAE takes only z_dim (width 96 fixed), so no tiny VAE can come through
    from_pretrained: the tiny VAE (diffsynth's class, built small) is assigned."""
    from diffsynth.core import ModelConfig
    from diffsynth.core.loader.file import hash_model_file
    from diffsynth.models import model_loader
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    from vdot_ext.apis.codecs import load_codec_state, load_wan_vae, umt5_architecture
    from vdot_ext.apis.inference import DiffSynthRenoiseScheduler, VCURequest, VDOTInference, build_pixels

    video = write_video(str(tmp_path / 'src.mp4'), frames=9, height=64, width=64)
    mask = write_video(str(tmp_path / 'mask.mp4'), frames=9, height=64, width=64, kind='mask')
    ref = write_image(str(tmp_path / 'ref.png'), 64, 64)
    prompt, seed = 'a red ball rolls on green grass', 11
    ours = VDOTInference.from_files(exported.out_dir, vae=release['vae'], text_encoder=release['text_encoder'],
                                    tokenizer=release['tokenizer'], dtype='fp32')
    pixels = build_pixels(VCURequest(prompt, src_video=video, src_mask=mask, src_ref_images=[ref]), 5, 64, 64)
    result = ours.generate(pixels, prompt, seed=seed, progress=False)

    text_entry = dict(model_hash=hash_model_file(release['text_encoder']), model_name='wan_video_text_encoder',
                      model_class='diffsynth.models.wan_video_text_encoder.WanTextEncoder',
                      extra_kwargs=dict(umt5_architecture(load_codec_state(release['text_encoder'], 't5'), 't5'),
                                        dropout=0.0))
    original = model_loader.MODEL_CONFIGS
    with E.register_with_diffsynth(exported.out_dir) as added:
        assert [e['model_name'] for e in added] == ['wan_video_dit', 'wan_video_vace']
        previous = model_loader.MODEL_CONFIGS
        model_loader.MODEL_CONFIGS = type(previous)(list(previous) + [text_entry])
        try:
            pipe = WanVideoPipeline.from_pretrained(
                torch_dtype=torch.float32, device='cpu',
                model_configs=[ModelConfig(path=E.export_files(exported.out_dir)),
                               ModelConfig(path=release['text_encoder'])],
                tokenizer_config=ModelConfig(path=release['tokenizer']))
        finally:
            model_loader.MODEL_CONFIGS = previous
    assert model_loader.MODEL_CONFIGS is original       # the registry is left as it was
    assert pipe.dit is not None and pipe.vace is not None and pipe.text_encoder is not None
    pipe.vae = load_wan_vae(release['vae'])
    frames, masks, ref_image = _pil_inputs(pixels)
    call = dict(prompt=prompt, vace_video=frames, vace_video_mask=masks, vace_reference_image=ref_image,
                seed=seed, height=64, width=64, num_frames=5, cfg_scale=1.0, num_inference_steps=4, tiled=False,
                output_type='floatpoint', progress_bar_cmd=lambda x: x)
    pipe.scheduler = DiffSynthRenoiseScheduler(seed, ours.sampler)
    video = pipe(**call)
    assert result.latents.abs().mean() > 0.1
    torch.testing.assert_close(pipe.scheduler.final_latents, result.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(video[0].clamp(-1, 1), result.video, rtol=0, atol=1e-5)
    # the adapter matters: diffsynth's deterministic Euler step gives another video
    from diffsynth.diffusion import FlowMatchScheduler
    pipe.scheduler = FlowMatchScheduler('Wan')
    euler = pipe(**call)
    assert (euler[0].clamp(-1, 1) - result.video).abs().max() > 1e-3


def _lora_student(seed=3):
    from vdot_ext.models.lora import LoRAAdapter
    torch.manual_seed(seed)
    model = WanVACEScore('tiny-vace').eval()
    LoRAAdapter(rank=4, alpha=8)(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.lora_B.' in name:
                p.normal_(0, 0.1)
    return model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 96, 2, 4, 4, generator=g))


def test_lora_module_is_merged_on_export(tmp_path):
    model = _lora_student()
    result = E.export_generator(model, str(tmp_path / 'lora'), max_shard_size='100KB')
    assert result.student['lora_merged'] is True
    assert not any('lora' in k or 'base_layer' in k for k in json.load(
        open(osp.join(result.out_dir, E.INDEX_NAME)))['weight_map'])
    merged = load_student(result.out_dir).model
    with torch.no_grad():
        torch.testing.assert_close(merged(*_inputs()), model(*_inputs()), rtol=1e-4, atol=1e-5)


def test_ema_weights_replace_the_live_ones(tmp_path):
    torch.manual_seed(5)
    model = WanVACEScore('tiny-vace')
    ema = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items() if k.startswith('dit.blocks.1.')}
    with pytest.raises(ValueError, match='ema_state_dict'):
        E.export_generator(model, str(tmp_path / 'x'), ema=True)
    result = E.export_generator(model, str(tmp_path / 'ema'), ema=True, ema_state_dict=ema)
    assert result.student['ema'] is True
    got = load_student(result.out_dir).model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], ema.get(k, v), rtol=0, atol=0)
    # the same from a state dict source
    from_dict = E.export_generator(model.state_dict(), str(tmp_path / 'ema2'), arch=model.arch, ema=True,
                                   ema_state_dict=ema)
    _assert_same(load_student(from_dict.out_dir).model.state_dict(), got)


def test_existing_folder_refused_and_failed_export_leaves_old_one(tmp_path, exported):
    torch.manual_seed(6)
    model = WanVACEScore('tiny-vace')
    out = str(tmp_path / 'student')
    first = E.export_generator(model, out)
    with pytest.raises(FileExistsError, match='overwrite'):
        E.export_generator(model, out)
    bad = model.state_dict()
    bad['dit.blocks.0.ffn.0.weight'] = bad['dit.blocks.0.ffn.0.weight'].clone()
    bad['dit.blocks.0.ffn.0.weight'][0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match='blocks.0.ffn.0.weight'):
        E.export_generator(bad, out, arch=model.arch, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ['student']        # no staging folder left behind
    _assert_same(load_student(out).model.state_dict(), model.state_dict())
    torch.manual_seed(7)
    other = WanVACEScore('tiny-vace')
    E.export_generator(other, out, overwrite=True, max_shard_size='50KB')
    _assert_same(load_student(out).model.state_dict(), other.state_dict())
    assert len(E.export_files(out)) > len(first.shards)    # the old shards are gone with the old folder


def test_sharding_rule_and_sizes():
    assert E.parse_size('5GB') == 5 * 10**9 and E.parse_size('2MiB') == 2 * 2**20 and E.parse_size(7) == 7
    with pytest.raises(ValueError, match='max_shard_size'):
        E.parse_size('five')
    plan = E.plan_shards([('a', 4), ('b', 4), ('c', 9), ('d', 1)], 8)
    assert plan == [['a', 'b'], ['c'], ['d']]


def _training_checkpoint(path, model, extra_prefix='real_score.'):
    state = {f'generator.{k}': v.clone() for k, v in model.state_dict().items()}
    state.update({f'{extra_prefix}{k}': torch.zeros_like(v) for k, v in model.state_dict().items()})
    torch.save({'state_dict': state, 'meta': {'iter': 10}}, path)
    return path


def test_cli_exports_a_training_checkpoint(tmp_path):
    from vdot_ext.tools.export import main
    torch.manual_seed(8)
    model = WanVACEScore('tiny-vace')
    ckpt = _training_checkpoint(str(tmp_path / 'iter_10.pth'), model)
    result = main(['--ckpt', ckpt, '--out', str(tmp_path / 'out'), '--dtype', 'bf16', '--max-shard-size', '80KB'])
    assert "preset 'tiny-vace'" in result.student['architecture_from']
    loaded = load_student(result.out_dir)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v.to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(SystemExit, match='exists'):
        main(['--ckpt', ckpt, '--out', str(tmp_path / 'out')])
    # no preset matches a custom width: the error says what to give
    torch.manual_seed(9)
    odd = WanVACEScore(dim=24, ffn_dim=48, num_heads=2, num_layers=2, text_dim=32, freq_dim=16, vace_layers=(0, ))
    odd_ckpt = _training_checkpoint(str(tmp_path / 'odd.pth'), odd)
    with pytest.raises(SystemExit, match='--config CONFIG or --preset'):
        main(['--ckpt', odd_ckpt, '--out', str(tmp_path / 'odd')])
    config = tmp_path / 'odd_config.py'
    config.write_text("model = dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', dim=24, ffn_dim=48, "
                      "num_heads=2, num_layers=2, text_dim=32, freq_dim=16, vace_layers=(0,)),\n"
                      "             generator_timesteps=(1000, 500), generator_shift=3.0)\n")
    result = main(['--ckpt', odd_ckpt, '--config', str(config), '--out', str(tmp_path / 'odd')])
    assert result.student['sampler']['timesteps'] == [1000.0, 500.0] and result.student['sampler']['shift'] == 3.0
    _assert_same(load_student(result.out_dir).model.state_dict(), odd.state_dict())


@pytest.mark.parametrize('layout', ['strategy_pth', 'peft_safetensors'])
def test_cli_merges_base_and_lora_file(tmp_path, release, layout):
    from vdot_ext.models.lora import lora_scale, merge_lora_state_dict
    from vdot_ext.tools.export import main
    lora_model = WanVACEScore('tiny-vace')
    lora_model.load_state_dict(release['model'].state_dict())
    from vdot_ext.models.lora import LoRAAdapter
    LoRAAdapter(rank=4, alpha=2)(lora_model)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if '.lora_B.' in name:
                p.normal_(0, 0.1)
    adapters = {k: v.detach().clone() for k, v in lora_model.state_dict().items() if '.lora_' in k}
    if layout == 'strategy_pth':   # RoleDeepSpeedStrategy's lora_<role>.pth
        path = str(tmp_path / 'lora_generator.pth')
        torch.save(dict(state_dict=adapters, module='generator', role='generator',
                        lora_config=dict(rank=4, alpha=2.0)), path)
    else:                          # peft's standard keys (no adapter name), release names, adapter_config.json
        folder = tmp_path / 'peft'
        folder.mkdir()
        path = str(folder / 'adapter_model.safetensors')
        save_file({E.release_key(k).replace('.default.', '.'): v.contiguous() for k, v in adapters.items()}, path)
        (folder / 'adapter_config.json').write_text(json.dumps(dict(r=4, lora_alpha=2.0)))
    result = main(['--ckpt', release['folder'], '--lora', path, '--out', str(tmp_path / 'merged')])
    expected = merge_lora_state_dict(release['model'].state_dict(), adapters, lora_scale(dict(rank=4, alpha=2)))
    got = load_student(result.out_dir).model.state_dict()
    _assert_same(got, expected)
    assert result.student['lora'] == path


ZERO3_EXPORT = r'''
import os, sys, torch
os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2])
import deepspeed
deepspeed.init_distributed(dist_backend='gloo')
from vdot_ext.apis.export import export_generator
from vdot_ext.models.wan_vace_score import WanVACEScore
torch.manual_seed(0)
reference = WanVACEScore('tiny-vace')
with deepspeed.zero.Init(config_dict_or_path={'train_micro_batch_size_per_gpu': 1,
                                              'zero_optimization': {'stage': 3}}):
    model = WanVACEScore('tiny-vace')
assert all(p.numel() == 0 for p in model.parameters())        # every parameter partitioned away
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    model.load_state_dict(reference.state_dict())
export_generator(model, sys.argv[1], max_shard_size='60KB')
torch.save(reference.state_dict(), sys.argv[1] + '.reference.pth')
'''


@pytest.mark.slow
def test_zero3_partitioned_generator_is_gathered_shard_by_shard(tmp_path):
    """What a training run calls at its end under ZeRO-3: the partitioned module's
    tensors are gathered per output shard (DeepSpeed single process, gloo)."""
    import subprocess
    import sys

    from vdot_ext.engine.deepspeed_strategy import free_port
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    out = str(tmp_path / 'zero3')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', ZERO3_EXPORT, out, str(free_port())], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(E.export_files(out)) > 1
    _assert_same(load_student(out).model.state_dict(), torch.load(out + '.reference.pth'))


# ---------------------------------------------------------------------------
# ExportGeneratorHook: the end of every training run (docs/DESIGN.md §7)
# ---------------------------------------------------------------------------
def _tiny_distiller_runner(work_dir, hooks, max_iters=3):
    """mmengine's plain Runner on the tiny distiller of tests/_deepspeed_worker.py
    (the generator steps every iteration, so its EMA moves)."""
    from _deepspeed_worker import RandomLatentVCUs  # noqa: F401  (registers the data set)
    from mmengine.runner import Runner
    adam = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0))
    return Runner(
        model=dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'), otd_loss=None,
                   dmd_loss=dict(type='DMDLoss'), gen_every=1, guidance_scale=1.0, uncond='zeros', seed=0,
                   generator_timesteps=(1000, 500), generator_shift=3.0),
        work_dir=str(work_dir), experiment_name='export_hook',
        train_dataloader=dict(batch_size=1, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate'), dataset=dict(type='RandomLatentVCUs')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=dict(constructor='RoleOptimWrapperConstructor', generator=adam, critic=adam),
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=100)),
        custom_hooks=hooks, default_scope='vdot_ext', randomness=dict(seed=0), log_level='WARNING',
        log_processor=dict(by_epoch=False))


def test_export_hook_on_the_plain_runner_writes_ema_and_trained_weights(tmp_path):
    from vdot_ext.engine.ema import GeneratorEMAHook
    from vdot_ext.engine.export_hook import ExportGeneratorHook
    from vdot_ext.utils import load_tensor_file
    runner = _tiny_distiller_runner(tmp_path, [GeneratorEMAHook(momentum=0.5),
                                               ExportGeneratorHook(max_shard_size='60KB')])
    runner.train()
    trained = {k: v.detach().clone() for k, v in runner.model.generator.state_dict().items()}
    ema = load_tensor_file(str(tmp_path / 'ema_generator.safetensors'))   # the EMA hook's own file
    assert set(ema) == set(trained)
    assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-4   # the test tells them apart
    # use_ema=True (default): export/ = EMA, export_raw/ = trained
    _assert_same(load_student(str(tmp_path / 'export')).model.state_dict(), ema)
    _assert_same(load_student(str(tmp_path / 'export_raw')).model.state_dict(), trained)
    info = E.read_student_info(str(tmp_path / 'export'))
    assert info['ema'] is True and info['ema_steps'] == 3 and info['momentum'] == 0.5 and info['iteration'] == 3
    assert info['dtype'] == 'float32' and info['module'] == 'generator'
    # the model's own steps: [1000, 500] warped by shift 3 (no config file here to name them)
    assert info['sampler'] == dict(timesteps=[1000.0, 750.0], shift=1.0, renoise='fresh')
    assert E.read_student_info(str(tmp_path / 'export_raw'))['ema'] is False
    assert len(E.export_files(str(tmp_path / 'export'))) > 1
    # use_ema=False: export/ = trained (the old folder replaced), export_ema/ = EMA
    ExportGeneratorHook(use_ema=False).after_train(runner)
    _assert_same(load_student(str(tmp_path / 'export')).model.state_dict(), trained)
    _assert_same(load_student(str(tmp_path / 'export_ema')).model.state_dict(), ema)
    # a model without the module exports nothing (and says so)
    ExportGeneratorHook(module='student', out_dir='none').after_train(runner)
    assert not osp.exists(tmp_path / 'none')
    with pytest.raises(ValueError, match='max_shard_size'):
        ExportGeneratorHook(max_shard_size='lots')


EXPORT_HOOK_CONFIG = '''
_base_ = ['{base}']
custom_imports = dict(imports=['_deepspeed_worker', 'vdot_ext.engine.export_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='GeneratorEMAHook', momentum=0.5),
                dict(type='ExportGeneratorHook', use_ema={use_ema}, max_shard_size='60KB'),
                dict(type='DumpWeightsHook')]
'''


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_export_hook_under_deepspeed_two_ranks_zero3_and_zero2(tmp_path):
    """FlexibleRunner + RoleDeepSpeedStrategy, 2 processes (gloo): the generator
    and its EMA, partitioned (ZeRO-3) or replicated (ZeRO-2), exported by rank 0
    equal the consolidated weights and the EMA hook's file; the run's DeepSpeed
    checkpoint folder reads back as the same student."""
    import subprocess
    import sys

    from _deepspeed_worker import tiny_config

    from vdot_ext.apis.student import read_student_weights
    from vdot_ext.engine.deepspeed_strategy import free_port
    from vdot_ext.utils import load_tensor_file
    here = osp.dirname(osp.abspath(__file__))
    root = osp.dirname(here)
    jobs, runs = [], {}
    for zero, use_ema in ((3, True), (2, False)):
        base = tiny_config(tmp_path / f'tiny_z{zero}.py', zero_stage=zero, max_iters=4, checkpoint_interval=4)
        cfg = tmp_path / f'export_z{zero}.py'
        cfg.write_text(EXPORT_HOOK_CONFIG.format(base=base.name, use_ema=use_ema))
        runs[zero] = tmp_path / f'z{zero}'
        jobs.append([str(cfg), '--work-dir', str(runs[zero]), '--launcher', 'pytorch',
                     '--cfg-options', f'experiment_name=z{zero}'])
    (tmp_path / 'jobs.json').write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, here, os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           f'--master_port={free_port()}', osp.join(here, '_deepspeed_worker.py'),
                           str(tmp_path / 'jobs.json')], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for zero, use_ema in ((3, True), (2, False)):
        work = runs[zero]
        final = torch.load(work / 'final_rank0.pt', weights_only=True)['state_dict']
        trained = {k[len('generator.'):]: v for k, v in final.items() if k.startswith('generator.')}
        ema = load_tensor_file(str(work / 'ema_generator.safetensors'))
        assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-5
        ema_dir, raw_dir = (work / 'export', work / 'export_raw') if use_ema else (work / 'export_ema',
                                                                                   work / 'export')
        _assert_same(load_student(str(raw_dir)).model.state_dict(), trained)
        _assert_same(load_student(str(ema_dir)).model.state_dict(), ema)
        assert len(E.export_files(str(raw_dir))) > 1
        assert not any(n.startswith(('.', 'export.partial')) or '.partial-' in n for n in os.listdir(work))
        # the 2-rank DeepSpeed checkpoint folder, consolidated: the same trained weights
        weights, _, _, _ = read_student_weights(str(work / 'iter_4.pth'))
        _assert_same(weights, trained)
