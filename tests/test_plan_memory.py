"""tools/plan_memory.py: parameter counts equal the built models' (meta
device), bytes follow the ZeRO formulas, LoRA counts only the adapters."""
import os.path as osp

import pytest
from mmengine.config import Config

from vdot_ext.models.register_token_discriminator import RegisterTokenDiscriminator
from vdot_ext.models.wan_vace_score import WanVACEScore, count_parameters
from vdot_ext.tools.plan_memory import GB, build_roles_on_meta, plan

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def cfg(name):
    return Config.fromfile(osp.join(ROOT, 'configs', name))


def test_counts_match_built_models_and_zero3_formulas():
    c = cfg('vdot_wan1.3b.py')
    result = plan(c, gpus=4, zero_stage=3)
    score = WanVACEScore('wan2.1-vace-1.3b', device='meta')
    p = count_parameters(score)
    disc = RegisterTokenDiscriminator(model_dim=1536, model_depth=30, taps=(13, 21, 29),
                                      tokens_per_tap=1, bottleneck_dim=512, num_heads=8,
                                      use_time_emb=True)
    roles = {r.name: r for r in result.roles}
    assert roles['generator'].params == roles['generator'].trainable == p
    assert roles['real_score'].params == p
    assert roles['critic'].params == p + count_parameters(disc)
    g = roles['generator']
    # bf16 ZeRO-3 on 4 GPUs: weights 2P/4, grads 2P/4, Adam m, v + fp32 master 12P/4
    assert g.weight_bytes == pytest.approx(2 * p / 4)
    assert g.grad_bytes == pytest.approx(2 * p / 4)
    assert g.optim_bytes == pytest.approx(12 * p / 4)
    assert roles['real_score'].grad_bytes == roles['real_score'].optim_bytes == 0
    # ZeRO-2: weights replicated, gradients and optimizer partitioned
    z2 = {r.name: r for r in plan(c, gpus=4, zero_stage=2).roles}
    assert z2['generator'].weight_bytes == pytest.approx(2 * p)
    assert z2['generator'].optim_bytes == pytest.approx(12 * p / 4)
    assert result.tokens == 21 * 30 * 52        # 81 frames, 480x832, patch 1x2x2
    assert result.peak_bytes > result.static_bytes > 0


def test_14b_counts_and_lora():
    c = cfg('lora/vdot_wan14b_lora.py')
    roles = build_roles_on_meta(c.model)
    full = count_parameters(WanVACEScore('wan2.1-vace-14b', device='meta'))
    assert count_parameters(roles['real_score']) == full
    lora = sum(p.numel() for n, p in roles['generator'].named_parameters() if '.lora_' in n)
    # rank 32 on q, k, v, o (self + cross) and ffn.0, ffn.2 of 40 DiT + 8 VACE blocks
    d, f, r = 5120, 13824, 32
    per_block = 8 * r * (d + d) + r * (d + f) + r * (f + d)
    assert lora == 48 * per_block
    result = plan(c, gpus=8, roles=roles)
    gen = {x.name: x for x in result.roles}['generator']
    assert gen.trainable == lora and gen.params == full + lora
    assert gen.optim_bytes == pytest.approx(12 * lora / 8)
    assert gen.grad_bytes == pytest.approx(2 * lora / 8)
    assert result.peak_bytes / GB < 80   # LoRA recipe on 8 x H100 (estimate)


def test_offload_moves_optimizer_off_gpu():
    c = cfg('vdot_wan1.3b.py')
    c.strategy.config.zero_optimization['offload_optimizer'] = dict(device='cpu')
    roles = {r.name: r for r in plan(c, gpus=4).roles}
    assert roles['generator'].optim_bytes == 0
    assert 'optimizer on CPU' in roles['generator'].notes[-1]
