"""LoRA students (peft): injection, frozen base through the distiller's role
switching, merge equality, adapter files in peft's layout (loaded by peft and
by diffsynth's LoRA loader, merged like peft's merge_and_unload), refusal of
base-rewriting initialisations, LoRA-only DeepSpeed checkpoints and, under
ZeRO-3, saved LoRA / merged weights equal to the live model's."""
import glob
import json
import os
import os.path as osp
import sys

import pytest
import torch

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DIFFSYNTH_WEIGHTS,
    LoRAAdapter,
    canonical_lora_key,
    is_lora_key,
    load_lora_state_dict,
    lora_scale,
    lora_state_dict,
    merge_lora_state_dict,
    merged_state_dict,
    peft_config_dict,
    read_lora_adapter,
    save_lora_adapter,
)
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.registry import MODELS

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)
TARGETS = ['q', 'k', 'v', 'o', 'ffn.0', 'ffn.2']


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


def trained_lora_model(alpha=8, **kwargs):
    """A tiny VACE score with LoRA (rank 4) whose B is no longer zero, and its base weights."""
    torch.manual_seed(0)
    model = WanVACEScore('tiny-vace').eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    LoRAAdapter(rank=4, alpha=alpha, **kwargs)(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if '.lora_B.' in n:
                p.normal_(0, 0.05)
    return model, base


def fresh_base(base):
    model = WanVACEScore('tiny-vace').eval()
    model.load_state_dict(base)
    return model


def test_adapter_files_are_peft_standard_and_load_everywhere(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    model, base = trained_lora_model(alpha=8)   # s = 2
    folder = str(tmp_path / 'lora_generator')
    save_lora_adapter(folder, lora_state_dict(model), peft_config_dict(model))
    assert sorted(os.listdir(folder)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, DIFFSYNTH_WEIGHTS])
    keys = list(load_file(osp.join(folder, ADAPTER_WEIGHTS)))
    # peft's standard keys: base_model.model.<layer>.lora_A.weight, no adapter name
    assert len(keys) == 120 and all(k.startswith('base_model.model.') for k in keys)
    assert all(k.endswith(('.lora_A.weight', '.lora_B.weight')) and '.default.' not in k for k in keys)
    with open(osp.join(folder, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    assert (config['r'], config['lora_alpha'], config['peft_type']) == (4, 8.0, 'LORA')
    x = inputs()
    with torch.no_grad():
        live = model(*x)
        # 1. peft: PeftModel.from_pretrained on the untouched base
        peft_model = PeftModel.from_pretrained(fresh_base(base), folder).eval()
        torch.testing.assert_close(peft_model(*x), live, rtol=0, atol=0)
        peft_merged = peft_model.merge_and_unload().state_dict()
        # 2. set_peft_model_state_dict into a freshly injected module
        injected = fresh_base(base)
        LoRAAdapter(rank=4, alpha=8)(injected)
        load_lora_state_dict(injected, read_lora_adapter(folder).state, folder)
        torch.testing.assert_close(injected(*x), live, rtol=0, atol=0)
    # 3. our merge (and the CLI) equals peft's merge_and_unload
    lora = read_lora_adapter(folder)
    merged = merge_lora_state_dict(base, lora.state, lora_scale(lora.config))
    assert merged.keys() == peft_merged.keys()
    for k, v in peft_merged.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=0, msg=k)
    from vdot_ext.tools.merge_lora import main as merge_main
    torch.save({'state_dict': {f'generator.{k}': v for k, v in base.items()}}, tmp_path / 'base.pth')
    cli = merge_main(['--lora', folder, '--base', str(tmp_path / 'base.pth'), '--out', str(tmp_path / 'm.safetensors')])
    assert all(torch.equal(cli[k], peft_merged[k]) for k in peft_merged)
    # 4. diffsynth's LoRA loader, given the release-layout file, fuses the same weights
    #    into the diffsynth modules (pipe.dit, pipe.vace) with its default alpha=1
    from diffsynth.utils.lora import GeneralLoRALoader
    target = fresh_base(base)
    release = load_file(osp.join(folder, DIFFSYNTH_WEIGHTS))
    assert any(k.startswith('blocks.0.self_attn.q.lora_A') for k in release)
    assert any(k.startswith('vace_blocks.0.') for k in release)
    loader = GeneralLoRALoader(device='cpu', torch_dtype=torch.float32)
    loader.fuse_lora_to_base_model(target.dit, release, alpha=1.0)
    loader.fuse_lora_to_base_model(target.vace, release, alpha=1.0)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, peft_merged[k], rtol=1e-6, atol=1e-6, msg=k)


def test_older_lora_files_still_load(tmp_path):
    model, base = trained_lora_model(alpha=8)
    live = {k: v for k, v in model.state_dict().items() if is_lora_key(k)}   # '.lora_A.default.weight'
    path = tmp_path / 'lora_generator.pth'
    torch.save(dict(state_dict=live, module='generator', lora_config=dict(rank=4, alpha=8.0)), path)
    lora = read_lora_adapter(str(path))   # weights_only load
    assert set(lora.state) == {canonical_lora_key(k) for k in live} and lora_scale(lora.config) == 2.0
    merged = merge_lora_state_dict(base, lora.state, lora_scale(lora.config))
    assert all(torch.equal(merged[k], v) for k, v in merged_state_dict(model).items())


def test_base_rewriting_initialisations_are_refused(tmp_path):
    """PiSSA replaces W by W_res = W − s·B₀A₀ inside the adapted layer; merging
    the adapters onto the released W (what merge_lora does) is then off by
    s·B₀A₀ (0.196 in this tiny model before this check existed)."""
    from peft import LoraConfig, get_peft_model
    with pytest.raises(ValueError, match='rewrites the base weights'):
        LoRAAdapter(rank=4, init_lora_weights='pissa')
    with pytest.raises(ValueError, match='rewrites the base weights'):
        LoRAAdapter(rank=4, init_lora_weights='olora')
    torch.manual_seed(0)
    released = WanVACEScore('tiny-vace').eval()
    base = {k: v.clone() for k, v in released.state_dict().items()}
    peft_model = get_peft_model(released, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     init_lora_weights='pissa'))
    folder = str(tmp_path / 'pissa')
    peft_model.save_pretrained(folder)   # peft's own file, init recorded in its config
    lora = read_lora_adapter(folder)
    wrong = merge_lora_state_dict(base, lora.state, lora_scale(lora.config))
    right = peft_model.merge_and_unload().state_dict()
    assert max(float((wrong[k] - right[k]).abs().max()) for k in right) > 0.05   # why it is refused
    from vdot_ext.tools.merge_lora import main as merge_main
    torch.save({'state_dict': {f'generator.{k}': v for k, v in base.items()}}, tmp_path / 'base.pth')
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrites the base weights"):
        merge_main(['--lora', folder, '--base', str(tmp_path / 'base.pth'), '--out', str(tmp_path / 'm.pth')])
    assert not (tmp_path / 'm.pth').exists()
    config = dict(r=4, lora_alpha=8, init_lora_weights=True, use_dora=True)
    with pytest.raises(ValueError, match='DoRA'):
        save_lora_adapter(str(tmp_path / 'dora'), lora.state, config)


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
    saved = read_lora_adapter(osp.join(ckpt, 'lora_generator'))   # peft layout folder
    # the saved LoRA (gathered from ZeRO-3 shards) equals the live adapters
    lora_live = {canonical_lora_key(k[len('generator.'):]): v for k, v in live.items()
                 if k.startswith('generator.') and is_lora_key(k)}
    assert saved.state.keys() == lora_live.keys()
    for k, v in lora_live.items():
        assert torch.equal(saved.state[k], v), k
    assert any(v.abs().sum() > 0 for k, v in lora_live.items() if '.lora_B.' in k)
    # base weights frozen = the teacher's (init_from_teacher)
    for k, v in live.items():
        if k.startswith('generator.') and '.base_layer.' in k:
            teacher = 'real_score.' + k[len('generator.'):].replace('.base_layer.', '.')
            assert torch.equal(v, live[teacher]), k
    # merge tool: teacher (base) + saved LoRA == the live model merged in place
    merged = merge_main(['--lora', osp.join(ckpt, 'lora_generator'),
                         '--base', osp.join(work, 'final_rank0.pt'),
                         '--base-prefix', 'real_score.', '--out', str(tmp_path / 'm.pth')])
    assert merged.keys() == out['merged_generator'].keys()
    for k, v in out['merged_generator'].items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)
    # the generator's engine checkpoint holds the LoRA weights only
    from vdot_ext.engine.deepspeed_checkpoint import deepspeed_safe_globals, read_checkpoint_state
    gen_files = glob.glob(osp.join(ckpt, 'generator', '*model_states.pt'))
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module = torch.load(gen_files[0], weights_only=True)['module']
    assert module and all(is_lora_key(k) for k in module)
    def size(role):
        return sum(os.path.getsize(f) for f in glob.glob(osp.join(ckpt, role, '*')))
    assert size('generator') * 5 < size('critic')
    # EMA (decay 0.5) was gathered into the checkpoint (a safetensors entry), LoRA keys only
    state = read_checkpoint_state(ckpt)
    key = 'ema_state_dict' if 'ema_state_dict' in state else 'generator_ema'   # mmengine's name / older
    assert {canonical_lora_key(k) for k in state[key]} == set(saved.state)
    assert osp.isfile(osp.join(ckpt, f'{key}.safetensors'))
