"""VACEAccWanInit: VACE model's Wan DiT weights replaced by a (few-step) Wan
T2V's, VACE weights untouched; sources: state dict, mmengine checkpoint file,
safetensors release; clear errors."""
import os

import numpy as np
import pytest
import torch
from mmengine.runner.checkpoint import save_checkpoint
from safetensors.torch import save_file

import vdot_ext.models  # noqa: F401  (registers the models)
from vdot_ext.models.vace_acc_wan_init import AccWanInitReport, VACEAccWanInit
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.registry import MODELS
from vdot_ext.utils import NonFiniteError, UnsafeCheckpointError, safe_torch_load, save_torch


class TinyGenerator(torch.nn.Module):
    """Stand-in for the stage-1 distiller: the generator under 'generator.'
    and the critics beside it, as the mmengine checkpoint stores them."""

    def __init__(self):
        super().__init__()
        self.generator = WanVACEScore('tiny')
        self.fake_score = WanVACEScore('tiny')


@pytest.fixture()
def models():
    torch.manual_seed(0)
    vace = WanVACEScore('tiny-vace')
    torch.manual_seed(1)
    stage1 = TinyGenerator()
    return vace, stage1


def _check_replaced(vace, wan, vace_before, report):
    for k, v in wan.dit.state_dict().items():
        torch.testing.assert_close(vace.dit.state_dict()[k], v, rtol=0,
                                   atol=0)
    for k, v in vace.vace.state_dict().items():
        torch.testing.assert_close(v, vace_before[k], rtol=0, atol=0)
    assert isinstance(report, AccWanInitReport)
    assert sorted(report.replaced) == sorted(
        'dit.' + k for k in wan.dit.state_dict())
    assert sorted(report.kept) == sorted(
        'vace.' + k for k in vace.vace.state_dict())
    assert report.missing == []


def test_from_mmengine_checkpoint_file(models, tmp_path):
    vace, stage1 = models
    path = str(tmp_path / 'iter_1500.pth')
    # the mmengine layout: {'meta': ..., 'state_dict': ..., 'message_hub':..}
    save_checkpoint({'meta': {'iter': 1500, 'seed': np.int64(0)},
                     'state_dict': stage1.state_dict(),
                     'message_hub': {'runtime_info': {'iter': 1500}}}, path)
    # numpy metadata (as mmengine writes) is what a bare weights_only=True
    # rejects; our allow-list reads it, still without unpickling code
    with pytest.raises(Exception, match='[Ww]eights only load failed'):
        torch.load(path, map_location='cpu', weights_only=True)
    ckpt = safe_torch_load(path)
    assert 'generator.dit.blocks.0.self_attn.q.weight' in ckpt['state_dict']
    vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
    params_before = {n: id(p) for n, p in vace.named_parameters()}
    report = VACEAccWanInit(path)(vace)
    _check_replaced(vace, stage1.generator, vace_before, report)
    assert report.source == path
    # the fake score's weights are not used
    assert any(k.startswith('fake_score.') for k in report.ignored)
    # in place: the same Parameter objects (optimisers/wrappers stay valid)
    assert params_before == {n: id(p) for n, p in vace.named_parameters()}
    # the model really changed: it computes with the stage-1 Wan blocks
    x = torch.randn(1, 16, 2, 4, 4)
    args = (x, torch.tensor([700.0]), torch.randn(1, 3, 32))
    with torch.no_grad():
        torch.testing.assert_close(vace.eval()(*args),
                                   stage1.generator.eval()(*args))


def test_from_state_dict_and_registry(models):
    vace, stage1 = models
    vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
    init = MODELS.build(dict(type='VACEAccWanInit',
                             source=stage1.generator.state_dict(),
                             source_prefix=''))
    report = init(vace)
    _check_replaced(vace, stage1.generator, vace_before, report)


def test_from_safetensors_release(models, tmp_path):
    vace, stage1 = models
    wan = stage1.generator
    sd = {k: v.contiguous() for k, v in wan.dit.state_dict().items()}
    keys = sorted(sd)
    for i in range(2):
        save_file({k: sd[k] for k in keys[i::2]},
                  str(tmp_path / f'diffusion_pytorch_model-0000{i + 1}-of-'
                      f'00002.safetensors'))
    vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
    report = VACEAccWanInit(str(tmp_path))(vace)
    _check_replaced(vace, wan, vace_before, report)


def test_shape_mismatch_names_key_shapes_and_source(models):
    vace, _ = models
    torch.manual_seed(2)
    other = WanVACEScore('tiny', ffn_dim=64)
    with pytest.raises(ValueError) as err:
        VACEAccWanInit(other.state_dict(), source_prefix='')(vace)
    msg = str(err.value)
    assert 'dit.blocks.0.ffn.0.weight: target (96, 48) vs source (64, 48)' \
        in msg
    assert '<state dict with' in msg


def test_missing_key_strict_and_non_strict(models):
    vace, stage1 = models
    sd = stage1.state_dict()
    del sd['generator.dit.blocks.3.self_attn.k.bias']
    with pytest.raises(ValueError, match=r"missing \[1\]: \['blocks.3."
                       r"self_attn.k.bias'\]"):
        VACEAccWanInit(sd)(vace)
    before = vace.dit.blocks[3].self_attn.k.bias.detach().clone()
    report = VACEAccWanInit(sd, strict=False)(vace)
    assert report.missing == ['dit.blocks.3.self_attn.k.bias']
    torch.testing.assert_close(vace.dit.blocks[3].self_attn.k.bias, before)
    torch.testing.assert_close(vace.dit.blocks[3].self_attn.q.bias,
                               stage1.generator.dit.blocks[3].self_attn.q.bias)


def test_errors(models, tmp_path):
    vace, stage1 = models
    with pytest.raises(ValueError, match=r"source_prefix='generator.'.*"
                       r"'dit.'"):
        VACEAccWanInit(stage1.generator.state_dict())(vace)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        VACEAccWanInit(str(tmp_path / 'nope.pth'))(vace)
    with pytest.raises(FileNotFoundError, match='source: checkpoint file'):
        VACEAccWanInit(str(tmp_path / 'nope.safetensors'))(vace)
    with pytest.raises(ValueError, match='has no VACE blocks'):
        VACEAccWanInit(stage1.state_dict())(stage1.generator)
    assert os.path.exists(tmp_path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_source_loads_safely_and_must_be_finite(models, tmp_path):
    vace, stage1 = models
    before = {k: v.clone() for k, v in vace.state_dict().items()}
    marker = tmp_path / 'ran'
    evil = str(tmp_path / 'stage1.pth')
    torch.save({'state_dict': stage1.state_dict(), 'meta': _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match='stage1.pth.*system'):
        VACEAccWanInit(evil)(vace)
    assert not marker.exists()
    key = 'generator.dit.blocks.1.cross_attn.o.weight'
    poisoned = dict(stage1.state_dict())
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = float('nan')
    path = str(tmp_path / 'nan.pth')
    save_torch({'state_dict': poisoned}, path)
    with pytest.raises(NonFiniteError, match=rf'nan.pth.*{key}'):
        VACEAccWanInit(path)(vace)
    with pytest.raises(NonFiniteError, match=rf'state dict.*{key}'):
        VACEAccWanInit(poisoned)(vace)
    # nothing was written into the target
    assert all(torch.equal(v, before[k]) for k, v in vace.state_dict().items())
