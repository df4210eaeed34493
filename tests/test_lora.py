"""LoRA students (peft): injection, frozen base through the distiller's role
switching, merge equality, LoRA-only DeepSpeed checkpoints and, under ZeRO-3,
saved LoRA / merged weights equal to the live model's."""
import glob
import os
import os.path as osp
import sys

import pytest
import torch

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.models.lora import (LoRAAdapter, is_lora_key, lora_scale,
                                  merge_lora_state_dict, merged_state_dict)
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.registry import MODELS

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)


def inputs(b=1, f=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 16, f, 8, 8, generator=g), torch.tensor([500.0] * b),
            torch.randn(b, 6, 32, generator=g), torch.randn(b, 96, f, 8, 8, generator=g))


def test_adapter_targets_and_identity_at_init():
    torch.manual_seed(0)
    model = WanVACEScore('tiny-vace').eval()
    x = inputs()
    with torch.no_grad():
        before = model(*x)
    report = LoRAAdapter(rank=4, alpha=8)(model)
    # DiffSynth targets: q, k, v, o of self- and cross-attention, ffn.0, ffn.2;
    # 4 DiT blocks + 2 VACE blocks, 10 layers each
    assert len(report.layers) == 60
    assert all(name.rsplit('.', 1)[-1] in 'qkvo' or name.endswith(('ffn.0', 'ffn.2'))
               for name in report.layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), before)   # B = 0 at init
    with pytest.raises(ValueError, match='target_modules'):
        LoRAAdapter(target_modules=['nope'])(WanVACEScore('tiny'))


def test_merge_equals_lora_model():
    torch.manual_seed(0)
    model = WanVACEScore('tiny-vace').eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    LoRAAdapter(rank=4, alpha=8)(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if '.lora_B.' in n:
                p.normal_(0, 0.05)
    lora = {k: v for k, v in model.state_dict().items() if is_lora_key(k)}
    merged = merge_lora_state_dict(base, lora, lora_scale(model._vdot_lora_config))
    assert set(merged) == set(base)
    plain = WanVACEScore('tiny-vace').eval()
    plain.load_state_dict(merged)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(*x), model(*x), rtol=1e-5, atol=1e-5)
    assert merged_state_dict(model).keys() == base.keys()
    bad = dict(lora)
    bad.pop(next(k for k in bad if '.lora_A.' in k))
    with pytest.raises(KeyError, match='lacks lora_A'):
        merge_lora_state_dict(base, bad, 2.0)


def test_distiller_lora_keeps_base_frozen():
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='VDOTDistiller', real_score=dict(type='WanVACEScore', preset='tiny-vace'),
        generator_lora=dict(type='LoRAAdapter', rank=4),
        dmd_loss=dict(type='DMDLoss'), gen_every=1, seed=1))
    optim = RoleOptimWrapperConstructor({r: dict(type='OptimWrapper', optimizer=dict(
        type='AdamW', lr=1e-2)) for r in model.trainable_roles()})(model)
    gen_params = [p for g in optim['generator'].param_groups for p in g['params']]
    assert gen_params and len(gen_params) == len(
        [n for n, _ in model.generator.named_parameters() if is_lora_key(n)])
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    data = dict(context=torch.randn(1, 6, 32, generator=g),
                latents=torch.randn(1, 16, 2, 8, 8, generator=g),
                vace_context=torch.randn(1, 96, 2, 8, 8, generator=g))
    for _ in range(2):
        model.train_step(data, optim)
    after = model.generator.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(is_lora_key(k) for k in changed)
    assert all(p.grad is None for n, p in model.generator.named_parameters()
               if not is_lora_key(n))


@pytest.mark.timeout(600)
def test_zero3_lora_checkpoint_and_merge_equal_live(tmp_path):
    from _deepspeed_worker import tiny_config
    from test_deepspeed_strategy import job, launch, load
    from vdot_ext.tools.merge_lora import main as merge_main
    cfg = tiny_config(tmp_path / 'lora_z3.py', zero_stage=3, max_iters=4, lora=True,
                      checkpoint_interval=4, ema=True)
    work = tmp_path / 'lora'
    launch([job(cfg, work, 'lora_z3', 'none')], tmp_path, nproc=1)
    out = load(work)
    live = out['state_dict']
    ckpt = osp.join(work, 'iter_4.pth')
    saved = torch.load(osp.join(ckpt, 'lora_generator.pth'), weights_only=False)
    # the saved LoRA (gathered from ZeRO-3 shards) equals the live adapters
    lora_live = {k[len('generator.'):]: v for k, v in live.items()
                 if k.startswith('generator.') and is_lora_key(k)}
    assert saved['state_dict'].keys() == lora_live.keys()
    for k, v in lora_live.items():
        assert torch.equal(saved['state_dict'][k], v), k
    assert any(v.abs().sum() > 0 for k, v in lora_live.items() if '.lora_B.' in k)
    # base weights frozen = the teacher's (init_from_teacher)
    for k, v in live.items():
        if k.startswith('generator.') and '.base_layer.' in k:
            teacher = 'real_score.' + k[len('generator.'):].replace('.base_layer.', '.')
            assert torch.equal(v, live[teacher]), k
    # merge tool: teacher (base) + saved LoRA == the live model merged in place
    merged = merge_main(['--lora', osp.join(ckpt, 'lora_generator.pth'),
                         '--base', osp.join(work, 'final_rank0.pt'),
                         '--base-prefix', 'real_score.', '--out', str(tmp_path / 'm.pth')])
    assert merged.keys() == out['merged_generator'].keys()
    for k, v in out['merged_generator'].items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)
    # the generator's engine checkpoint holds the LoRA weights only
    gen_files = glob.glob(osp.join(ckpt, 'generator', '*model_states.pt'))
    module = torch.load(gen_files[0], weights_only=False)['module']
    assert module and all(is_lora_key(k) for k in module)
    size = lambda role: sum(os.path.getsize(f) for f in glob.glob(osp.join(ckpt, role, '*')))
    assert size('generator') * 5 < size('critic')
    # EMA (decay 0.5) was gathered into the checkpoint, LoRA keys only
    state = torch.load(osp.join(ckpt, 'vdot_state.pth'), weights_only=False)
    assert set(state['generator_ema']) == set(saved['state_dict'])
