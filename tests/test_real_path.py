"""The real user's path, rehearsed on CPU with the real recipe files (issue 10 §4).

The commands are the ones the README gives, run in subprocesses exactly as a user
types them; only the model preset (tiny), the data (a small manifest of real mp4
files and its cache), the local weights and the iteration counts are overridden:

1. ``python -m vdot_ext.tools.precompute_vcu --config <stage config> ...`` for the
   caption manifest (stage 1) and the VCU manifest (stage 2), with the Wan2.1 VAE
   and umT5 files (tiny, real layout);
2. stage 1: ``torchrun --nproc_per_node 2 -m vdot_ext.tools.train
   configs/vdot_wan14b_stage1.py --launcher pytorch`` (DeepSpeed ZeRO-3, gloo),
   which ends by writing ``<work_dir>/export`` (``ExportGeneratorHook``);
3. stage 2: the same with ``configs/vdot_wan14b.py`` and
   ``model.generator_init.source=<stage-1 work_dir>/export`` (AccWanInit), which
   ends by writing its own ``export``;
4. ``python -m vdot_ext.tools.export --ckpt <stage-2 iter_N.pth folder> --config <its config>``
   (re-exporting a checkpoint by hand gives the run's own export, bit for bit);
5. ``python -m vdot_ext.tools.infer --ckpt <stage-2 export> --manifest ...``, which
   writes an mp4.

The weights are tiny checkpoints in the real release layouts (tests/real_layout.py):
``Wan2.1-T2V-14B/`` and ``Wan2.1-VACE-14B/`` folders with sharded
``diffusion_pytorch_model-*.safetensors`` + index + ``config.json``, ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth`` and ``google/umt5-xxl``. The 1.3B recipe files
get the same rehearsal (ZeRO-2 there, as those configs say). ``python -m torch.distributed.run``
is ``torchrun``; ``mim train vdot_ext CONFIG --launcher pytorch --gpus N`` launches the same
entry point. Wall time on 2 shared CPU cores: about 3.5 min (14B files) + 2.5 min (1.3B files).

Run alone: ``python -m pytest -m slow tests/test_real_path.py``; or, keeping the work dirs,
``PYTHONPATH=. python tests/test_real_path.py OUT_DIR [14b|1.3b]``.
"""
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import time

import pytest
import torch

from vdot_ext.engine.deepspeed_strategy import free_port

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from real_layout import write_video, write_wan_release_folder  # noqa: E402

# the recipe pairs (stage 1, stage 2) and what the configs themselves choose
RECIPES = {
    '14b': dict(stage1='configs/vdot_wan14b_stage1.py', stage2='configs/vdot_wan14b.py', zero=3,
                t2v='Wan2.1-T2V-14B', vace='Wan2.1-VACE-14B'),
    '1.3b': dict(stage1='configs/vdot_wan1.3b_stage1.py', stage2='configs/vdot_wan1.3b.py', zero=2,
                 t2v='Wan2.1-T2V-1.3B', vace='Wan2.1-VACE-1.3B'),
}
NPROC = 2
FRAMES, SIZE = 5, 32                 # clips: 5 frames at 32x32 -> latents [16, 2, 4, 4]
ITERS = dict(stage1=6, stage2=4)     # stage 1: TTUR 5 -> the generator steps at iterations 0 and 5
# Wan's negative prompt stands in as one word: the teacher's CFG needs a negative context
NEGATIVE_PROMPT = 'blurry'
PROMPTS = ('a red ball rolls on green grass', 'the cat jumps over blue box', 'dog runs in park',
           'sunset sky bright colourful scene')
VCU_TASKS = ('t2v', 'grey', 'outpaint', 'extension')



def write_assets(root: str, t2v_name: str = 'Wan2.1-T2V-14B', vace_name: str = 'Wan2.1-VACE-14B') -> dict:
    """The user's files: two tiny Wan2.1 model folders (T2V, VACE) with the same
    codecs, four mp4 clips and the manifests."""
    models = osp.join(root, 'models')
    t2v = write_wan_release_folder(osp.join(models, t2v_name), preset='tiny', seed=0, codec_seed=0)
    vace = write_wan_release_folder(osp.join(models, vace_name), preset='tiny-vace', seed=5, codec_seed=0)
    data = osp.join(root, 'data')
    os.makedirs(data, exist_ok=True)
    for i in range(len(PROMPTS)):
        # 64x64 sources (decord needs widths it can decode unpadded); the datasets resize to 32x32
        write_video(osp.join(data, f'clip{i}.mp4'), frames=9, height=64, width=64, seed=i)
    with open(osp.join(data, 'captions.csv'), 'w', encoding='utf-8') as f:
        f.write('id,task,prompt,video\n')
        f.writelines(f'c{i},t2v,{p},clip{i}.mp4\n' for i, p in enumerate(PROMPTS))
    with open(osp.join(data, 'vcu.csv'), 'w', encoding='utf-8') as f:
        f.write('id,task,prompt,video\n')
        f.writelines(f'v{i},{t},{p},clip{i}.mp4\n' for i, (t, p) in enumerate(zip(VCU_TASKS, PROMPTS)))
    with open(osp.join(data, 'infer.csv'), 'w', encoding='utf-8') as f:
        f.write('id,task,prompt,video\n')
        f.write(f'mine,outpaint,{PROMPTS[0]},clip0.mp4\n')
    return dict(t2v=t2v['folder'], vace=vace['folder'], vae=t2v['vae'], text_encoder=t2v['text_encoder'],
                tokenizer=t2v['tokenizer'], t2v_files=t2v['dit_files'], data=data)


class Commands:
    """The README's commands with this rehearsal's overrides; each run is logged to
    ``<root>/logs/<name>.log`` and timed."""

    def __init__(self, root: str, assets: dict):
        self.root, self.assets = root, assets
        self.logs = osp.join(root, 'logs')
        os.makedirs(self.logs, exist_ok=True)
        self.seconds = {}
        self.commands = {}

    def run(self, name: str, argv, nproc: int = 1, timeout: int = 1500):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
                   OMP_NUM_THREADS='1')
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            env.pop(key, None)
        if nproc > 1:
            cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                   f'--master_port={free_port()}', '-m'] + list(argv)
        else:
            cmd = [sys.executable, '-m'] + list(argv)
        self.commands[name] = ' '.join(shlex.quote(c) for c in cmd)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        with open(osp.join(self.logs, f'{name}.log'), 'w', encoding='utf-8') as f:
            f.write(f'$ {self.commands[name]}\n\n{proc.stdout}\n--- stderr ---\n{proc.stderr}')
        if proc.returncode != 0:
            raise AssertionError(f'{name} failed ({proc.returncode}): {self.commands[name]}\n'
                                 f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
        return proc

    def precompute(self, name: str, config: str, manifest: str, cache_dir: str):
        a = self.assets
        return self.run(name, ['vdot_ext.tools.precompute_vcu', '--config', config, '--manifest', manifest,
                               '--cache-dir', cache_dir, '--num-frames', str(FRAMES), '--height', str(SIZE),
                               '--width', str(SIZE), '--negative-prompt', NEGATIVE_PROMPT,
                               '--vae-type', 'WanVideoVAE', '--vae-checkpoint', a['vae'],
                               '--text-encoder-type', 'WanTextEncoder', '--text-encoder-checkpoint',
                               a['text_encoder'], '--tokenizer', a['tokenizer']])

    def data_options(self, manifest: str, cache_dir: str):
        return [f'train_dataloader.dataset.manifest={manifest}', f'train_dataloader.dataset.cache_dir={cache_dir}',
                f'train_dataloader.dataset.num_frames={FRAMES}', f'train_dataloader.dataset.height={SIZE}',
                f'train_dataloader.dataset.width={SIZE}',
                f'train_dataloader.dataset.negative_prompt={NEGATIVE_PROMPT}']

    def train(self, name: str, config: str, work_dir: str, options, allow_new=False):
        argv = ['vdot_ext.tools.train', config, '--work-dir', work_dir, '--launcher', 'pytorch']
        if allow_new:
            argv.append('--cfg-options-allow-new')
        return self.run(name, argv + ['--cfg-options'] + list(options), nproc=NPROC)


def _config_has(config: str, dotted: str) -> bool:
    from mmengine.config import Config
    node = Config.fromfile(osp.join(ROOT, config))
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint'), encoding='utf-8') as f:
        return f.read().strip()


def rehearse(root: str, recipe: str) -> dict:
    """Run the whole path for one recipe pair; returns what the checks read."""
    spec = RECIPES[recipe]
    assets = write_assets(root, spec['t2v'], spec['vace'])
    cmd = Commands(root, assets)
    data = assets['data']
    captions, vcu = osp.join(data, 'captions.csv'), osp.join(data, 'vcu.csv')
    cache1, cache2 = osp.join(data, 'cache_captions'), osp.join(data, 'cache_vcu')
    cmd.precompute('precompute_stage1', spec['stage1'], captions, cache1)
    cmd.precompute('precompute_stage2', spec['stage2'], vcu, cache2)
    # the dataset needs the negative prompt the cache was built with; the configs do not name one yet
    allow_new = not _config_has(spec['stage1'], 'train_dataloader.dataset.negative_prompt')

    stage1 = osp.join(root, 'work_dirs', 'stage1')
    cmd.train('stage1', spec['stage1'], stage1,
              ['model.real_score.preset=tiny', f'model.real_score.pretrained={assets["t2v"]}',
               f'train_cfg.max_iters={ITERS["stage1"]}'] + cmd.data_options(captions, cache1), allow_new)

    stage2 = osp.join(root, 'work_dirs', 'stage2')
    cmd.train('stage2', spec['stage2'], stage2,
              ['model.real_score.preset=tiny-vace', f'model.real_score.pretrained={assets["vace"]}',
               # the 4-block tiny fake score: taps after blocks 1, 2, 3 (the configs' taps follow the 40/30 blocks)
               'model.discriminator.taps=(1,2,3)',
               f'model.generator_init.source={osp.join(stage1, "export")}',
               f'train_cfg.max_iters={ITERS["stage2"]}'] + cmd.data_options(vcu, cache2), allow_new)

    # re-export a checkpoint by hand (README: tools.export): the stage-2 DeepSpeed folder, with the run's config
    config_name = osp.basename(spec['stage2'])
    cmd.run('export', ['vdot_ext.tools.export', '--ckpt', _last_checkpoint(stage2), '--config',
                       osp.join(stage2, config_name), '--dtype', 'bf16', '--out', osp.join(root, 'exports', 'stage2')])

    out = osp.join(root, 'infer')
    cmd.run('infer', ['vdot_ext.tools.infer', '--ckpt', osp.join(stage2, 'export'), '--vae', assets['vae'],
                      '--text_encoder', assets['text_encoder'], '--tokenizer', assets['tokenizer'],
                      '--manifest', osp.join(data, 'infer.csv'), '--size', f'{SIZE}*{SIZE}',
                      '--frame_num', str(FRAMES), '--save_dir', out])
    return dict(root=root, assets=assets, stage1=stage1, stage2=stage2, infer=out, seconds=cmd.seconds,
                commands=cmd.commands, allow_new=allow_new, logs=cmd.logs, zero=spec['zero'])


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
def check_stage1(run: dict) -> None:
    from vdot_ext.apis.export import CONFIG_NAME, INDEX_NAME, STUDENT_NAME, export_files, read_release_config
    from vdot_ext.models.checkpoint_io import load_checkpoint_files
    from vdot_ext.models.vace_acc_wan_init import read_deepspeed_role_state_dict
    export = osp.join(run['stage1'], 'export')
    for name in (INDEX_NAME, CONFIG_NAME, STUDENT_NAME):
        assert osp.isfile(osp.join(export, name)), name
    config = json.load(open(osp.join(export, CONFIG_NAME), encoding='utf-8'))
    assert config['_class_name'] == 'WanModel' and config['model_type'] == 't2v'
    assert read_release_config(export)['num_layers'] == 4
    student = json.load(open(osp.join(export, STUDENT_NAME), encoding='utf-8'))
    assert student['sampler'] == dict(timesteps=[1000.0, 750.0, 500.0, 250.0], shift=5.0, renoise='fresh')
    assert student['iteration'] == ITERS['stage1'] and student['ema'] is False and student['dtype'] == 'bfloat16'
    released = load_checkpoint_files(export_files(export))
    # the release key layout: the teacher's own file names and keys, no prefixes
    assert set(released) == set(load_checkpoint_files(run['assets']['t2v_files']))
    # the export is the trained generator: the DeepSpeed checkpoint's fp32 master weights of the
    # generator engine (consolidated from the 2 ranks' ZeRO partitions) in the run's bf16
    masters = read_deepspeed_role_state_dict(_last_checkpoint(run['stage1']))
    assert {k[len('generator.dit.'):] for k in masters} == set(released)
    for key, value in released.items():
        assert value.dtype == torch.bfloat16, key
        torch.testing.assert_close(value, masters['generator.dit.' + key].to(torch.bfloat16), rtol=0, atol=0)


def check_stage2(run: dict) -> None:
    from vdot_ext.apis.export import CONFIG_NAME, export_files
    from vdot_ext.models.checkpoint_io import load_checkpoint_files
    export = osp.join(run['stage2'], 'export')
    # tools.export of the run's last DeepSpeed checkpoint (fp32 masters, cast to bf16) = the run's own export
    by_hand = load_checkpoint_files(export_files(osp.join(run['root'], 'exports', 'stage2')))
    own = load_checkpoint_files(export_files(export))
    assert set(by_hand) == set(own) and all(torch.equal(by_hand[k], own[k]) for k in own)
    config = json.load(open(osp.join(export, CONFIG_NAME), encoding='utf-8'))
    assert config['_class_name'] == 'VaceWanModel' and config['vace_layers'] == [0, 2]
    log = open(osp.join(run['logs'], 'stage2.log'), encoding='utf-8').read()
    # AccWanInit read the stage-1 export: all 123 Wan DiT tensors replaced, nothing missing
    assert f'from {osp.join(run["stage1"], "export")}' in log
    assert 'AccWanInit: replaced 123 Wan DiT tensors' in log and 'missing 0' in log


def check_infer(run: dict) -> None:
    import numpy as np

    from vdot_ext.data.video_io import read_video
    outputs = json.load(open(osp.join(run['infer'], 'outputs.json'), encoding='utf-8'))['outputs']
    assert [(o['id'], o['task']) for o in outputs] == [('mine', 'outpaint')]
    assert outputs[0]['video'] == osp.join(run['infer'], 'mine.mp4')
    frames = read_video(outputs[0]['video'], backend='imageio')   # decord reads no frame narrower than 64 px
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and float(np.std(frames)) > 1.0


# ---------------------------------------------------------------------------
# fast: the training data path reads the real-layout codec files (issue 10 §1, item 3)
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    return write_assets(str(tmp_path_factory.mktemp('real_path')))


def test_training_codecs_read_the_wan_release_codec_files(assets):
    """``VCUCodecs`` (dataset, precompute_vcu) loads ``Wan2.1_VAE.pth`` and
    ``models_t5_umt5-xxl-enc-bf16.pth`` at the width the files hold, and encodes
    exactly as diffsynth's classes built by hand at that width."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    from vdot_ext.patches.vcu_dataset import VCUManifestDataset
    codec = dict(vae=dict(type='WanVideoVAE', checkpoint=assets['vae']),
                 text_encoder=dict(type='WanTextEncoder', checkpoint=assets['text_encoder'],
                                   tokenizer=assets['tokenizer']))
    dataset = VCUManifestDataset(osp.join(assets['data'], 'vcu.csv'), num_frames=FRAMES, height=SIZE, width=SIZE,
                                 codec=codec, negative_prompt=NEGATIVE_PROMPT)
    item = dataset[1]
    assert item['latents'].shape == (16, 2, SIZE // 8, SIZE // 8) and item['vace_context'].shape[0] == 96
    # diffsynth's own classes, built by hand at the files' sizes
    vae_state = torch.load(assets['vae'], weights_only=True)
    with skip_model_initialization():
        vae = WanVideoVAE(z_dim=16)
        vae.model = VideoVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                              temperal_downsample=[False, True, True], dropout=0.0)
    vae.model.load_state_dict(vae_state, assign=True)
    vae.float().eval()
    video = dataset.build_pixels(1).video_tensor()[None]
    with torch.no_grad():
        torch.testing.assert_close(item['latents'], vae.encode(video, device='cpu')[0].float(), rtol=1e-5, atol=1e-5)
    text_state = torch.load(assets['text_encoder'], weights_only=True)
    vocab, dim = text_state['token_embedding.weight'].shape
    encoder = WanTextEncoder(vocab=vocab, dim=dim, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2,
                             num_buckets=32, shared_pos=False, dropout=0.0)
    encoder.load_state_dict(text_state)
    encoder.to(torch.bfloat16).eval()
    tokenizer = HuggingfaceTokenizer(name=assets['tokenizer'], seq_len=512, clean='whitespace')
    ids, mask = tokenizer([PROMPTS[1], NEGATIVE_PROMPT], return_mask=True, add_special_tokens=True)
    with torch.no_grad():
        expected = encoder(ids, mask).float()
    for row, key in enumerate(('context', 'negative_context')):
        length = int(mask[row].sum())
        torch.testing.assert_close(item[key][:length], expected[row, :length], rtol=0, atol=0)
        assert not item[key][length:].any()   # zero past the prompt (diffsynth's prompt embedder)
    # errors name the codec fields
    bad = dict(codec, text_encoder=dict(codec['text_encoder'], tokenizer=osp.join(assets['data'], 'nope')))
    with pytest.raises(FileNotFoundError, match='codec.text_encoder.tokenizer'):
        VCUManifestDataset(osp.join(assets['data'], 'vcu.csv'), num_frames=FRAMES, height=SIZE, width=SIZE,
                           codec=bad)[0]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize('recipe', list(RECIPES))
def test_real_recipe_files_stage1_stage2_export_infer(recipe, tmp_path):
    run = rehearse(str(tmp_path), recipe)
    check_stage1(run)
    check_stage2(run)
    check_infer(run)
    print(json.dumps(dict(recipe=recipe, seconds=run['seconds'], allow_new=run['allow_new'])))


if __name__ == '__main__':
    out_dir, which = sys.argv[1], (sys.argv[2:] or list(RECIPES))
    for name in which:
        start = time.perf_counter()
        result = rehearse(osp.join(out_dir, name), name)
        check_stage1(result)
        check_stage2(result)
        check_infer(result)
        print(json.dumps(dict(recipe=name, total_seconds=round(time.perf_counter() - start, 1),
                              seconds=result['seconds'], allow_new=result['allow_new'],
                              commands=result['commands']), indent=1))
