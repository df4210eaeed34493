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


# ---------------------------------------------------------------------------
# the stage hand-off sources (docs/DESIGN.md §7): an export, a release, a DeepSpeed folder
# ---------------------------------------------------------------------------
def test_from_stage1_export_folder(models, tmp_path):
    """What stage 1 leaves (ExportGeneratorHook): sharded safetensors + index,
    config.json, vdot_student.json, release key layout."""
    from vdot_ext.apis.export import export_generator
    vace, stage1 = models
    out = export_generator(stage1.generator, str(tmp_path / 'stage1' / 'export'), max_shard_size='60KB')
    assert len(out.shards) > 1
    vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
    report = VACEAccWanInit(out.out_dir)(vace)
    _check_replaced(vace, stage1.generator, vace_before, report)
    assert report.ignored == [] and report.source == out.out_dir


def test_from_step_distilled_release_index_and_vace_keys_ignored(models, tmp_path):
    """A diffsynth / Wan2.1 release of a step-distilled T2V, given by its
    index.json; a VACE release's own VACE tensors are named as ignored."""
    from real_layout import DIT_INDEX, release_state_dict, write_dit_release
    vace, stage1 = models
    write_dit_release(release_state_dict(stage1.generator), str(tmp_path / 'distilled'), shards=3)
    vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
    report = VACEAccWanInit(str(tmp_path / 'distilled' / DIT_INDEX))(vace)
    _check_replaced(vace, stage1.generator, vace_before, report)
    torch.manual_seed(4)
    other_vace = WanVACEScore('tiny-vace')
    write_dit_release(release_state_dict(other_vace), str(tmp_path / 'vace_release'), shards=2)
    report = VACEAccWanInit(str(tmp_path / 'vace_release'))(vace)
    assert sorted(report.ignored) == sorted(other_vace.vace.state_dict())
    torch.testing.assert_close(vace.dit.blocks[0].self_attn.q.weight, other_vace.dit.blocks[0].self_attn.q.weight)


def test_export_of_another_size_names_the_mis_shaped_keys(models, tmp_path):
    from vdot_ext.apis.export import export_generator
    vace, _ = models
    torch.manual_seed(2)
    out = export_generator(WanVACEScore('tiny', ffn_dim=64), str(tmp_path / 'export'))
    with pytest.raises(ValueError) as err:
        VACEAccWanInit(out.out_dir)(vace)
    msg = str(err.value)
    assert 'dit.blocks.0.ffn.0.weight: target (96, 48) vs source (64, 48)' in msg and '[12]' in msg
    assert out.out_dir in msg


# DeepSpeed checkpoint folders of RoleDeepSpeedStrategy, written by real runs
# (tools/train.py, one process, gloo) of the tiny distiller of tests/_deepspeed_worker.py
def _train_jobs(tmp_path, jobs):
    import json
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    jobs_file = tmp_path / 'jobs.json'
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, here, os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, os.path.join(here, '_deepspeed_worker.py'), str(jobs_file)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_from_deepspeed_checkpoint_folder_zero2_zero3_and_lora(tmp_path):
    from _deepspeed_worker import tiny_config

    from vdot_ext.apis.student import load_student, read_student_weights
    from vdot_ext.models.vace_acc_wan_init import deepspeed_safe_globals, read_deepspeed_role_state_dict
    runs = {}
    jobs = []
    for name, zero, lora in (('z2', 2, False), ('z3', 3, False), ('lora', 2, True)):
        cfg = tiny_config(tmp_path / f'{name}.py', zero_stage=zero, max_iters=2, checkpoint_interval=2, lora=lora)
        if lora:   # the LoRA run also ends with the stage hand-off: base + merged adapters
            (tmp_path / 'lora_export.py').write_text(
                f"_base_ = ['{cfg.name}']\n"
                "custom_imports = dict(imports=['_deepspeed_worker', 'vdot_ext.engine.export_hook'])\n"
                "custom_hooks = [dict(type='ExportGeneratorHook'), dict(type='DumpWeightsHook')]\n")
            cfg = tmp_path / 'lora_export.py'
        runs[name] = tmp_path / name
        jobs.append([str(cfg), '--work-dir', str(runs[name]), '--launcher', 'none',
                     '--cfg-options', f'experiment_name={name}'])
    _train_jobs(tmp_path, jobs)
    for name in ('z2', 'z3'):
        folder = str(runs[name] / 'iter_2.pth')
        final = torch.load(runs[name] / 'final_rank0.pt', weights_only=True)['state_dict']
        trained = {k[len('generator.'):]: v for k, v in final.items() if k.startswith('generator.')}
        # DeepSpeed's consolidation of the generator engine: the trained weights (fp32 run)
        state = read_deepspeed_role_state_dict(folder)
        assert set(state) == {f'generator.{k}' for k in trained}
        torch.manual_seed(0)
        vace = WanVACEScore('tiny-vace')
        vace_before = {k: v.clone() for k, v in vace.vace.state_dict().items()}
        report = VACEAccWanInit(folder)(vace)
        for k, v in vace.dit.state_dict().items():
            torch.testing.assert_close(v, trained['dit.' + k], rtol=0, atol=0, msg=f'{name} {k}')
        for k, v in vace.vace.state_dict().items():
            torch.testing.assert_close(v, vace_before[k], rtol=0, atol=0)
        assert len(report.replaced) == len(vace.dit.state_dict()) and report.missing == []
        # the generator's own VACE blocks are not part of AccWanInit: named as ignored
        assert sorted(report.ignored) == sorted(f'generator.vace.{k}' for k in vace.vace.state_dict())
        # the same folder as a student (tools.infer / tools.export --ckpt)
        weights, arch, files, notes = read_student_weights(folder)
        assert files == [folder] and 'fp32 master weights' in notes[0]
        assert all(torch.equal(weights[k], trained[k]) for k in trained)
        assert load_student(folder, preset='tiny-vace').arch['vace_layers'] == (0, 2)
    # a LoRA run's engine holds only the adapters: refused, pointing at the export
    lora_folder = str(runs['lora'] / 'iter_2.pth')
    with pytest.raises(ValueError, match='LoRA run.*export'):
        VACEAccWanInit(lora_folder)(WanVACEScore('tiny-vace'))
    with pytest.raises(ValueError, match='LoRA run.*--lora'):
        read_student_weights(lora_folder)
    merged = torch.load(runs['lora'] / 'final_rank0.pt', weights_only=True)['merged_generator']
    exported = load_student(str(runs['lora'] / 'export')).model.state_dict()
    assert set(exported) == set(merged)
    for k, v in merged.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert VACEAccWanInit(str(runs['lora'] / 'export'))(WanVACEScore('tiny-vace')).missing == []
    # the engine files load without unpickling code: a planted object is refused
    optim = sorted((runs['z3'] / 'iter_2.pth' / 'generator').glob('*optim_states.pt'))[0]
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        payload = safe_torch_load(str(optim))
    marker = tmp_path / 'ran'
    payload['evil'] = _RunsCode(marker)
    torch.save(payload, optim)
    with pytest.raises(UnsafeCheckpointError, match='optim_states.pt.*system'):
        VACEAccWanInit(str(runs['z3'] / 'iter_2.pth'))(WanVACEScore('tiny-vace'))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no engine folder for role 'score'"):
        read_deepspeed_role_state_dict(str(runs['z2'] / 'iter_2.pth'), role='score')
