"""Inference on one's own VCU: the sampler is training's rollout, the CLI (VACE
flags, tasks, manifest batch mode, side-by-side, errors naming flag and file),
`mim test`'s tools/test.py, and base + LoRA."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from real_layout import write_image, write_video, write_wan_release_folder

from vdot_ext.apis import inference as I
from vdot_ext.data.video_io import read_video


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    return write_wan_release_folder(str(tmp_path_factory.mktemp('Wan2.1-VACE-tiny')))


@pytest.fixture(scope='module')
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp('media')
    return dict(video=write_video(str(d / 'src.mp4'), frames=9, height=64, width=80),
                mask=write_video(str(d / 'mask.mp4'), frames=9, height=64, width=80, kind='mask'),
                depth=write_video(str(d / 'depth.mp4'), frames=9, height=64, width=80, seed=3),
                short=write_video(str(d / 'short.mp4'), frames=3, height=64, width=80),
                ref=write_image(str(d / 'ref.png')), folder=str(d))


def _codec_flags(release):
    return ['--vae', release['vae'], '--text_encoder', release['text_encoder'], '--tokenizer', release['tokenizer']]


def _run(release, *args):
    from vdot_ext.tools.infer import main
    return main(['--ckpt', release['folder'], '--dtype', 'fp32', '--device', 'cpu', '--size', '64*64',
                 '--frame_num', '5', *args])


def test_sampler_is_the_training_rollout():
    """All steps of VDOTDistiller.rollout (Eq. 7) from the same noise sequence."""
    from vdot_ext.models.vdot_distiller import VDOTDistiller
    torch.manual_seed(0)
    distiller = VDOTDistiller(real_score=dict(type='WanVACEScore', preset='tiny-vace')).eval()
    with torch.no_grad():
        for p in distiller.generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    context, vace = torch.randn(1, 5, 32, generator=g), torch.randn(1, 96, 2, 4, 4, generator=g)
    shape = (1, 16, 2, 4, 4)
    torch.manual_seed(42)
    noises = [torch.randn(shape) for _ in range(4)]
    torch.manual_seed(42)
    first = torch.randn(shape)
    expected = distiller.generate(context, vace, noise=first)      # draws ε_1..ε_3 with randn_like
    got = I.sample_student(distiller.generator, context, vace, noises[0], distiller.generator_timesteps,
                           lambda i: noises[i])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # and not an artefact of the noise: other re-noising noise, other result
    other = I.sample_student(distiller.generator, context, vace, noises[0], distiller.generator_timesteps,
                             lambda i: noises[(i + 1) % 4])
    assert (other - expected).abs().max() > 1e-3


def test_timesteps_are_training_and_diffsynth_schedule():
    from diffsynth.diffusion import FlowMatchScheduler
    torch.testing.assert_close(I.sampling_timesteps(4), torch.tensor([1000.0, 937.5, 833.3333, 625.0]))
    for n in (2, 4, 8):
        _, expected = FlowMatchScheduler.set_timesteps_wan(n, shift=5.0)
        torch.testing.assert_close(I.sampling_timesteps(n), expected.float(), rtol=1e-6, atol=1e-4)
    assert I.sampling_timesteps(2, dict(timesteps=[1000, 500], shift=1.0)).tolist() == [1000.0, 500.0]
    assert I.parse_size('832*480') == (832, 480) and I.parse_size('480p') == (832, 480)
    with pytest.raises(ValueError, match='--size'):
        I.parse_size('830*480')


def test_vace_inputs_as_given(release, media, tmp_path):
    """No --task: src_video / src_mask / refs are the VCU (VACE's prepare_source)."""
    px = I.build_pixels(I.VCURequest('a ball', src_video=media['video'], src_mask=media['mask'],
                                     src_ref_images=[media['ref']]), 5, 64, 64)
    assert px.task == 'vace' and px.num_ref == 1 and px.missing is None
    assert px.masks.shape == (5, 64, 64) and 0 < px.masks.mean() < 1
    torch.testing.assert_close(px.frames_tensor(), px.video_tensor())   # the source video itself, not greyed
    out = _run(release, '--prompt', 'a red ball rolls', '--src_video', media['video'], '--src_mask', media['mask'],
               '--src_ref_images', media['ref'], '--save_file', str(tmp_path / 'a.mp4'), '--side_by_side')
    video = read_video(out[0]['video'], backend='imageio')
    assert video.shape == (5, 64, 64, 3)
    sbs = read_video(out[0]['side_by_side'], backend='imageio')
    assert sbs.shape[0] == 5 and sbs.shape[2] == 4 * 64 + 3 * 2     # ref | condition | mask | output


def test_tasks_build_the_training_condition(release, media, tmp_path):
    from vdot_ext.patches.conditions import grey_video
    grey = I.build_pixels(I.VCURequest('x', task='gray', src_video=media['video']), 5, 64, 64)
    assert grey.task == 'grey'
    np.testing.assert_array_equal(grey.frames, grey_video(grey.video))
    t2v = I.build_pixels(I.VCURequest('x', task='t2v'), 5, 64, 64)
    assert t2v.task == 't2v' and t2v.frames_tensor().abs().max() == 0 and t2v.masks.all()
    depth = I.build_pixels(I.VCURequest('x', task='depth', src_video=media['depth']), 5, 64, 64)
    assert depth.task == 'depth' and depth.masks.all()
    first = I.build_pixels(I.VCURequest('x', task='firstframe_depth', src_video=media['video'],
                                        src_condition=media['depth']), 5, 64, 64)
    np.testing.assert_array_equal(first.frames[0], first.video[0])          # frame 0 from the source video
    np.testing.assert_array_equal(first.frames[1:], depth.frames[1:])        # then the depth video
    assert not first.masks[0].any() and first.masks[1:].all()
    inpaint = I.build_pixels(I.VCURequest('x', task='inpaint', src_video=media['video'], box=(20, 16, 60, 48)),
                             5, 64, 64)
    assert inpaint.task == 'inpaint' and 0 < inpaint.masks.mean() < 1
    out = _run(release, '--prompt', 'a cat jumps', '--task', 'outpainting', '--src_video', media['video'],
               '--task_options', '{"expand_ratio": 0.25}', '--save_dir', str(tmp_path))
    assert out[0]['task'] == 'outpaint' and osp.isfile(osp.join(str(tmp_path), 'out_video.mp4'))


@pytest.fixture(scope='module')
def pipe(release):
    return I.VDOTInference.from_files(release['folder'], vae=release['vae'], text_encoder=release['text_encoder'],
                                      tokenizer=release['tokenizer'], dtype='fp32')


def test_seed_decides_the_video(pipe, media):
    pixels = I.build_pixels(I.VCURequest('x', task='grey', src_video=media['video']), 5, 64, 64)
    runs = [pipe.generate(pixels, 'a red ball', seed=seed, progress=False) for seed in (1, 1, 2)]
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=0, atol=0)
    assert (runs[0].latents - runs[2].latents).abs().max() > 1e-2
    noise, _ = I.initial_noise(runs[0].latents.shape, 1)
    assert (runs[0].latents - noise).abs().max() > 1e-2


def test_manifest_batch_mode(release, media, tmp_path):
    manifest = tmp_path / 'm.jsonl'
    rows = [dict(id='g', task='grey', prompt='a blue box', video=media['video']),
            dict(id='p', task='inpaint', prompt='a dog runs', video=media['video'], mask=media['mask']),
            dict(id='r', task='reference', prompt='a cat', video=media['video'], ref_images=[media['ref']])]
    manifest.write_text('\n'.join(json.dumps(r) for r in rows))
    out = _run(release, '--manifest', str(manifest), '--save_dir', str(tmp_path / 'out'))
    assert [o['id'] for o in out] == ['g', 'p', 'r'] and [o['seed'] for o in out] == [2025, 2026, 2027]
    listing = json.load(open(tmp_path / 'out' / 'outputs.json'))
    assert [osp.basename(o['video']) for o in listing['outputs']] == ['g.mp4', 'p.mp4', 'r.mp4']
    with pytest.raises(SystemExit, match='--prompt and --manifest'):
        _run(release, '--manifest', str(manifest), '--prompt', 'x')


@pytest.mark.parametrize('args, expected', [
    (['--src_video', 'MISSING.mp4'], r"field '--src_video', file MISSING\.mp4: no such file"),
    (['--task', 'grey', '--src_video', 'SHORT'],
     r"field '--src_video', file .*short\.mp4: too few frames.*--frame_num"),
    (['--src_mask', 'MASK'], r"field '--src_mask'.*needs --src_video"),
    (['--task', 'inpaint', '--src_video', 'VIDEO'], r"field '--src_mask'.*needs a mask"),
    (['--task', 'image_depth', '--src_video', 'VIDEO'], r"field '--task'.*single image"),
    (['--src_ref_images', 'VIDEO'], r"field '--src_ref_images', file .*src\.mp4: cannot read as an image"),
    (['--task', 'firstframe_depth', '--src_video', 'VIDEO', '--src_condition', 'SHORT'],
     r"field '--src_condition'.*must align"),
    (['--frame_num', '6'], '--frame_num: must be 4n\\+1'),
    (['--size', '100*64'], '--size'),
    (['--text_encoder', 'NOPE.pth'], r"--text_encoder: file 'NOPE\.pth' does not exist"),
])
def test_errors_name_the_flag_and_the_file(release, media, tmp_path, args, expected):
    subst = dict(SHORT=media['short'], MASK=media['mask'], VIDEO=media['video'])
    args = [subst.get(a, a) for a in args]
    with pytest.raises(SystemExit, match=expected):
        _run(release, '--prompt', 'x', '--save_file', str(tmp_path / 'x.mp4'), *args)


def test_help_reads_like_vace(capsys):
    from vdot_ext.tools.infer import get_parser
    text = get_parser().format_help()
    for flag in ('--prompt', '--src_video', '--src_mask', '--src_ref_images', '--task', '--size', '--frame_num',
                 '--base_seed', '--sample_steps', '--save_dir', '--save_file', '--offload_model', '--manifest',
                 '--ckpt', '--lora', '--vae', '--text_encoder', '--tokenizer', '--dtype', '--side_by_side'):
        assert flag in text, flag
    flat = ' '.join(text.split())
    assert "Separated by ','" in flat and 'The number should be 4n+1' in flat
    args = get_parser().parse_args(['--seed', '3', '--steps', '2', '--offload_model', 'True'])
    assert (args.seed, args.steps, args.offload) == (3, 2, True)


def test_t2v_student_refuses_a_vace_condition(media, tmp_path):
    from real_layout import write_tokenizer, write_umt5, write_wan_vae

    from vdot_ext.apis.export import export_generator
    from vdot_ext.models.wan_vace_score import WanVACEScore
    folder = str(tmp_path / 't2v')
    export_generator(WanVACEScore('tiny'), folder)
    tok = write_tokenizer(osp.join(folder, 'google', 'umt5-xxl'))
    write_umt5(osp.join(folder, 'models_t5_umt5-xxl-enc-bf16.pth'), vocab=60)
    write_wan_vae(osp.join(folder, 'Wan2.1_VAE.pth'))
    release = dict(folder=folder, tokenizer=tok)
    out = _run(release, '--prompt', 'a dog', '--save_file', str(tmp_path / 't.mp4'))
    assert out[0]['task'] == 't2v'
    with pytest.raises(SystemExit, match='text-to-video model'):
        _run(release, '--prompt', 'a dog', '--task', 'grey', '--src_video', media['video'],
             '--save_file', str(tmp_path / 'g.mp4'))


def test_base_plus_lora_equals_the_merged_export(release, media, pipe, tmp_path):
    from vdot_ext.apis.export import export_generator
    from vdot_ext.apis.student import load_student
    from vdot_ext.models.lora import LoRAAdapter
    from vdot_ext.models.wan_vace_score import WanVACEScore
    model = WanVACEScore('tiny-vace')
    model.load_state_dict(release['model'].state_dict())
    LoRAAdapter(rank=2)(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.lora_B.' in name:
                p.normal_(0, 0.2)
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if '.lora_' in k}
    lora_file = str(tmp_path / 'lora_generator.pth')
    torch.save(dict(state_dict=lora, lora_config=dict(rank=2, alpha=2.0)), lora_file)
    merged = str(tmp_path / 'merged')
    export_generator(load_student(release['folder'], lora=lora_file).model, merged)
    pixels = I.build_pixels(I.VCURequest('x', task='grey', src_video=media['video']), 5, 64, 64)
    codecs = dict(vae=release['vae'], text_encoder=release['text_encoder'], tokenizer=release['tokenizer'],
                  dtype='fp32')
    with_lora = I.VDOTInference.from_files(release['folder'], lora=lora_file, **codecs)
    from_export = I.VDOTInference.from_files(merged, **codecs)
    a, b, plain = (p.generate(pixels, 'a red ball', seed=3, progress=False).latents
                   for p in (with_lora, from_export, pipe))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - plain).abs().max() > 1e-3
    out = _run(release, '--prompt', 'a red ball', '--task', 'grey', '--src_video', media['video'], '--lora',
               lora_file, '--base_seed', '3', '--save_file', str(tmp_path / 'a.mp4'), *_codec_flags(release))
    assert out[0]['video'] == str(tmp_path / 'a.mp4')


def test_mim_test_writes_metrics(release, media, tmp_path):
    """tools/test.py (what `mim test vdot_ext CONFIG --checkpoint CKPT` runs, with the
    checkpoint positional) on a manifest: per-task condition-fidelity metrics of
    the output and of the real video, samples, metrics.json."""
    from vdot_ext.tools.test import main
    config = tmp_path / 'cfg.py'
    config.write_text(
        "model = dict(type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'))\n"
        "train_dataloader = dict(dataset=dict(type='VCUManifestDataset', manifest='??? set me', num_frames=5,\n"
        f"    height=64, width=64, codec=dict(vae=dict(type='WanVideoVAE', checkpoint={release['vae']!r}),\n"
        f"    text_encoder=dict(type='WanTextEncoder', checkpoint={release['text_encoder']!r},\n"
        f"                      tokenizer={release['tokenizer']!r}))))\n")
    manifest = tmp_path / 'test.jsonl'
    manifest.write_text('\n'.join(json.dumps(r) for r in [
        dict(id='g', task='grey', prompt='a blue box', video=media['video']),
        dict(id='p', task='inpaint', prompt='a dog', video=media['video'], mask=media['mask']),
        dict(id='d', task='depth', prompt='a dog', video=media['video'], condition=media['depth'])]))
    work = tmp_path / 'work'
    summary = main([str(config), release['folder'], '--manifest', str(manifest), '--work-dir', str(work),
                    '--dtype', 'fp32', '--device', 'cpu', '--launcher', 'none'])
    saved = json.load(open(work / 'metrics.json'))
    assert saved['samples'] == 3 and saved['steps'] == 4 and saved['geometry'] == [5, 64, 64]
    assert set(saved['metrics']) == {'grey', 'inpaint'}        # depth has no metric
    assert set(saved['metrics']['grey']) == {'output/luma_psnr', 'real/luma_psnr'}
    assert saved['metrics']['inpaint']['real/kept_psnr'] > saved['metrics']['inpaint']['output/kept_psnr']
    assert sorted(p.name for p in (work / 'samples').iterdir()) == ['d.mp4', 'g.mp4', 'p.mp4']
    assert summary['metrics'] == saved['metrics']
    with pytest.raises(SystemExit, match='--manifest'):
        main([str(config), '--checkpoint', release['folder'], '--work-dir', str(work)])
