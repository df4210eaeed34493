"""Real-layout checkpoints (tiny) load through diffsynth's loader/converters
into WanVACEScore: every tensor lands; missing/mismatched files fail clearly."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from vdot_ext.models.checkpoint_io import load_wan_vace_state_dict, resolve_checkpoint_files
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.models.weights import load_weights, read_state_dict
from vdot_ext.utils import NonFiniteError, UnsafeCheckpointError, save_torch

# key names of the official releases (Wan-AI/Wan2.1-T2V-*, Wan2.1-VACE-14B)
REAL_DIT_KEYS = [
    'patch_embedding.weight', 'patch_embedding.bias',
    'text_embedding.0.weight', 'text_embedding.2.bias',
    'time_embedding.0.weight', 'time_projection.1.weight',
    'blocks.0.self_attn.q.weight', 'blocks.0.self_attn.norm_q.weight',
    'blocks.0.cross_attn.k.weight', 'blocks.0.norm3.weight',
    'blocks.0.ffn.0.weight', 'blocks.0.ffn.2.bias', 'blocks.0.modulation',
    'head.head.weight', 'head.modulation'
]
REAL_VACE_KEYS = [
    'vace_patch_embedding.weight', 'vace_blocks.0.before_proj.weight',
    'vace_blocks.0.after_proj.weight', 'vace_blocks.1.after_proj.bias',
    'vace_blocks.0.self_attn.q.weight', 'vace_blocks.1.modulation'
]


def release_state_dict(model: WanVACEScore):
    """The release layout: DiT keys and VACE keys side by side, no prefixes."""
    sd = {k: v.clone() for k, v in model.dit.state_dict().items()}
    if model.vace is not None:
        sd.update({k: v.clone() for k, v in model.vace.state_dict().items()})
    return sd


def write_sharded(sd, folder, shards=3, index=True):
    """Like the release: diffusion_pytorch_model-0000k-of-0000n.safetensors
    + diffusion_pytorch_model.safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(sd)
    names, weight_map = [], {}
    for i in range(shards):
        name = (f'diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}'
                '.safetensors')
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        names.append(os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    if index:
        with open(os.path.join(folder,
                               'diffusion_pytorch_model.safetensors.index'
                               '.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': weight_map}, f)
    return names


def assert_same_weights(model: WanVACEScore, sd):
    got = release_state_dict(model)
    assert got.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0,
                                   msg=lambda s, k=k: f'{k}: {s}')


@pytest.fixture(scope='module')
def vace_release(tmp_path_factory):
    torch.manual_seed(0)
    src = WanVACEScore('tiny-vace')
    sd = release_state_dict(src)
    assert set(REAL_DIT_KEYS + REAL_VACE_KEYS) <= set(sd)  # real names
    folder = str(tmp_path_factory.mktemp('Wan2.1-VACE-tiny'))
    files = write_sharded(sd, folder)
    return src, sd, folder, files


def test_vace_release_loads_every_tensor(vace_release):
    src, sd, folder, files = vace_release
    for pretrained in (files, folder,
                       os.path.join(folder, 'diffusion_pytorch_model.'
                                    'safetensors.index.json'),
                       os.path.join(folder, 'diffusion_pytorch_model-*')):
        model = WanVACEScore('tiny-vace', pretrained=pretrained)
        assert next(model.parameters()).device.type == 'cpu'
        assert_same_weights(model, sd)
    # and it computes what the source model computes
    x = torch.randn(1, 16, 2, 4, 4)
    args = (x, torch.tensor([600.0]), torch.randn(1, 3, 32),
            torch.randn(1, 96, 2, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(*args), src.eval()(*args))


def test_t2v_model_from_vace_files_takes_only_the_dit(vace_release):
    _, sd, folder, _ = vace_release
    model = WanVACEScore('tiny', pretrained=folder, dtype='bfloat16')
    assert not model.has_vace
    assert model.dtype == torch.bfloat16
    for k, v in model.dit.state_dict().items():
        torch.testing.assert_close(v, sd[k].bfloat16(), rtol=0, atol=0)


def test_vace_model_from_t2v_files_fails(tmp_path):
    torch.manual_seed(1)
    sd = release_state_dict(WanVACEScore('tiny'))
    save_file(sd, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
    with pytest.raises(ValueError, match='contain no VACE weights'):
        WanVACEScore('tiny-vace', pretrained=str(tmp_path))


def test_model_prefix_and_diffusers_layout(tmp_path):
    torch.manual_seed(2)
    sd = release_state_dict(WanVACEScore('tiny'))
    # 'model.'-prefixed (a training-framework export)
    save_file({'model.' + k: v for k, v in sd.items()},
              str(tmp_path / 'prefixed.safetensors'))
    assert_same_weights(
        WanVACEScore('tiny', pretrained=str(tmp_path / 'prefixed.safetensors')),
        sd)
    # diffusers layout (WanTransformer3DModel names), written by hand
    to_wan = {
        'condition_embedder.text_embedder.linear_1': 'text_embedding.0',
        'condition_embedder.text_embedder.linear_2': 'text_embedding.2',
        'condition_embedder.time_embedder.linear_1': 'time_embedding.0',
        'condition_embedder.time_embedder.linear_2': 'time_embedding.2',
        'condition_embedder.time_proj': 'time_projection.1',
        'patch_embedding': 'patch_embedding', 'proj_out': 'head.head',
    }
    block = {'attn1.to_q': 'self_attn.q', 'attn1.to_k': 'self_attn.k',
             'attn1.to_v': 'self_attn.v', 'attn1.to_out.0': 'self_attn.o',
             'attn1.norm_q': 'self_attn.norm_q',
             'attn1.norm_k': 'self_attn.norm_k',
             'attn2.to_q': 'cross_attn.q', 'attn2.to_k': 'cross_attn.k',
             'attn2.to_v': 'cross_attn.v', 'attn2.to_out.0': 'cross_attn.o',
             'attn2.norm_q': 'cross_attn.norm_q',
             'attn2.norm_k': 'cross_attn.norm_k',
             'ffn.net.0.proj': 'ffn.0', 'ffn.net.2': 'ffn.2',
             'norm2': 'norm3'}
    diffusers = {'scale_shift_table': sd['head.modulation']}
    for name, wan in to_wan.items():
        for p in ('weight', 'bias'):
            diffusers[f'{name}.{p}'] = sd[f'{wan}.{p}']
    for i in range(4):
        diffusers[f'blocks.{i}.scale_shift_table'] = sd[
            f'blocks.{i}.modulation']
        for name, wan in block.items():
            for p in ('weight', 'bias'):
                if f'blocks.{i}.{wan}.{p}' in sd:
                    diffusers[f'blocks.{i}.{name}.{p}'] = sd[
                        f'blocks.{i}.{wan}.{p}']
    assert len(diffusers) == len(sd)
    save_file(diffusers, str(tmp_path / 'diffusers.safetensors'))
    assert_same_weights(
        WanVACEScore('tiny',
                     pretrained=str(tmp_path / 'diffusers.safetensors')), sd)


def test_missing_file_names_path_and_field(tmp_path):
    missing = str(tmp_path / 'diffusion_pytorch_model-00001-of-00007'
                  '.safetensors')
    with pytest.raises(FileNotFoundError, match=r'pretrained: checkpoint '
                       r'file .*00001-of-00007.safetensors.* does not exist'):
        WanVACEScore('tiny-vace', pretrained=[missing])
    with pytest.raises(FileNotFoundError, match='contains no'):
        resolve_checkpoint_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='matches no file'):
        resolve_checkpoint_files(str(tmp_path / '*.safetensors'))


def test_mismatched_shapes_listed_with_file(tmp_path):
    torch.manual_seed(3)
    other = WanVACEScore('tiny-vace', ffn_dim=64)  # not the model's 96
    files = write_sharded(release_state_dict(other), str(tmp_path), shards=2,
                          index=False)
    with pytest.raises(ValueError) as err:
        WanVACEScore('tiny-vace', pretrained=files)
    msg = str(err.value)
    assert 'shape mismatch' in msg and 'field `pretrained`' in msg
    assert 'blocks.0.ffn.0.weight: checkpoint (64, 48) vs model (96, 48)' \
        in msg
    assert 'diffusion_pytorch_model-00001-of-00002.safetensors' in msg


def test_missing_and_unexpected_keys_listed(vace_release, tmp_path):
    _, sd, _, _ = vace_release
    broken = dict(sd)
    del broken['blocks.2.cross_attn.v.bias']
    del broken['vace_blocks.1.after_proj.weight']
    broken['img_emb.proj.0.weight'] = torch.zeros(3)  # an I2V-only key
    path = str(tmp_path / 'broken.safetensors')
    save_file(broken, path)
    with pytest.raises(ValueError, match=r"missing \[1\]: \['blocks.2."
                       r"cross_attn.v.bias'\].*unexpected \[1\]: \['img_emb"):
        WanVACEScore('tiny-vace', pretrained=path)
    del broken['img_emb.proj.0.weight']
    broken['blocks.2.cross_attn.v.bias'] = sd['blocks.2.cross_attn.v.bias']
    save_file(broken, path)
    with pytest.raises(ValueError, match=r"WanVACEScore.vace .*missing \[1\]: "
                       r"\['vace_blocks.1.after_proj.weight'\]"):
        WanVACEScore('tiny-vace', pretrained=path)


def test_load_wan_vace_state_dict_splits_parts(vace_release):
    _, sd, folder, files = vace_release
    dit_sd, vace_sd, got_files = load_wan_vace_state_dict(folder,
                                                          has_vace=True)
    assert got_files == files
    assert set(dit_sd) | set(vace_sd) == set(sd)
    assert not any(k.startswith('vace') for k in dit_sd)
    assert all(k.startswith('vace') for k in vace_sd)
    dit_only = load_wan_vace_state_dict(files, has_vace=False)
    assert dit_only.vace is None and dit_only.dit.keys() == dit_sd.keys()


def test_nan_in_a_release_shard_is_an_error_naming_the_file(vace_release,
                                                            tmp_path):
    _, sd, _, _ = vace_release
    poisoned = dict(sd)
    poisoned['blocks.1.ffn.0.bias'] = poisoned['blocks.1.ffn.0.bias'].clone()
    poisoned['blocks.1.ffn.0.bias'][3] = float('nan')
    files = write_sharded(poisoned, str(tmp_path), shards=2, index=False)
    bad = next(f for f in files if 'blocks.1.ffn.0.bias' in
               __import__('safetensors.torch', fromlist=['load_file'])
               .load_file(f))
    with pytest.raises(NonFiniteError,
                       match=rf"{bad}.*blocks.1.ffn.0.bias"):
        WanVACEScore('tiny-vace', pretrained=str(tmp_path))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_read_state_dict_loads_safely_and_checks_finiteness(tmp_path):
    """load_weights/read_state_dict: weights_only=True (a crafted file is
    refused, its code never runs), safetensors too, NaN/Inf named."""
    torch.manual_seed(4)
    model = WanVACEScore('tiny')
    sd = {'generator.' + k: v for k, v in model.state_dict().items()}
    path = str(tmp_path / 'final_model.pth')
    save_torch({'state_dict': sd, 'meta': {'iter': 3}}, path)
    target = WanVACEScore('tiny')
    load_weights(target, path, prefix='generator.')
    assert_same_weights(target, release_state_dict(model))
    save_file(sd, str(tmp_path / 'w.safetensors'))
    assert read_state_dict(str(tmp_path / 'w.safetensors')).keys() == sd.keys()
    # crafted: refused, nothing ran
    marker = tmp_path / 'ran'
    torch.save({'state_dict': sd, 'x': _RunsCode(marker)},
               tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='evil.pth.*system'):
        load_weights(target, str(tmp_path / 'evil.pth'), prefix='generator.')
    assert not marker.exists()
    # NaN / Inf: an error naming the field, the file and the tensor
    key = 'generator.dit.blocks.0.self_attn.q.weight'
    bad = dict(sd, **{key: sd[key].clone().fill_(float('inf'))})
    save_torch({'state_dict': bad}, str(tmp_path / 'inf.pth'))
    with pytest.raises(NonFiniteError,
                       match=rf'evaluate.checkpoint: .*inf.pth.*{key}'):
        load_weights(target, str(tmp_path / 'inf.pth'), prefix='generator.',
                     field='evaluate.checkpoint')
