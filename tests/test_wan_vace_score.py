"""WanVACEScore: composed forward == diffsynth's model_fn_wan_video, features,
gradient checkpointing, presets vs diffsynth's own configs, errors."""
import pytest
import torch
from diffsynth.models.wan_video_dit import WanModel, sinusoidal_embedding_1d
from diffsynth.pipelines.wan_video import model_fn_wan_video

from vdot_ext.models.flow_matching import x0_from_velocity
from vdot_ext.models.wan_vace_score import PRESETS, ScoreFeatures, WanVACEScore, count_parameters
from vdot_ext.registry import MODELS


def _inputs(b, vace=True, seed=0, frames=3, h=4, w=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, frames, h, w, generator=g)
    t = torch.tensor([700.0, 250.0, 980.0][:b])
    ctx = torch.randn(b, 5, 32, generator=g)
    vc = torch.randn(b, 96, frames, h, w, generator=g) if vace else None
    return x, t, ctx, vc


@pytest.fixture(scope='module')
def vace_model():
    torch.manual_seed(0)
    return WanVACEScore('tiny-vace').eval()


@pytest.fixture(scope='module')
def t2v_model():
    torch.manual_seed(1)
    return WanVACEScore('tiny').eval()


@pytest.mark.parametrize('batch', [1, 2])
def test_t2v_matches_model_fn(t2v_model, batch):
    x, t, ctx, _ = _inputs(batch, vace=False)
    with torch.no_grad():
        v = t2v_model(x, t, ctx)
        ref = model_fn_wan_video(dit=t2v_model.dit, latents=x, timestep=t,
                                 context=ctx)
    assert v.shape == x.shape
    assert v.abs().mean() > 1e-3  # not a degenerate all-zero output
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch', [1, 2])
def test_vace_matches_model_fn(vace_model, batch):
    x, t, ctx, vc = _inputs(batch)
    with torch.no_grad():
        v = vace_model(x, t, ctx, vc, vace_scale=0.7)
        ref = model_fn_wan_video(dit=vace_model.dit, vace=vace_model.vace,
                                 latents=x, timestep=t, context=ctx,
                                 vace_context=vc, vace_scale=0.7)
        no_vace = vace_model(x, t, ctx)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    # the VACE hints really enter the output
    assert (v - no_vace).abs().max() > 1e-3


def test_vace_scale_tensor_per_sample(vace_model):
    x, t, ctx, vc = _inputs(2)
    with torch.no_grad():
        v = vace_model(x, t, ctx, vc, vace_scale=torch.tensor([0.3, 1.0]))
        v0 = vace_model(x[:1], t[:1], ctx[:1], vc[:1], vace_scale=0.3)
        v1 = vace_model(x[1:], t[1:], ctx[1:], vc[1:], vace_scale=1.0)
    torch.testing.assert_close(v, torch.cat([v0, v1]), rtol=1e-5, atol=1e-5)


def test_hidden_capture_matches_hooks_and_head(vace_model):
    m = vace_model
    x, t, ctx, vc = _inputs(2)
    seen = {}
    # input of block i+1 == hidden after block i (hint of block i included)
    hooks = [m.dit.blocks[i + 1].register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].clone()))
        for i in (0, 2)]
    # output of block 1 (not a VACE layer) == hidden after block 1
    hooks.append(m.dit.blocks[1].register_forward_hook(
        lambda mod, args, out: seen.__setitem__(1, out.clone())))
    try:
        with torch.no_grad():
            v, feats = m(x, t, ctx, vc, return_hidden_at=(2, 0, 1, 3))
    finally:
        for hk in hooks:
            hk.remove()
    assert isinstance(feats, ScoreFeatures)
    assert feats.grid == (3, 2, 3)
    assert [h.shape for h in feats.hidden] == [torch.Size([2, 18, 48])] * 4
    torch.testing.assert_close(feats.hidden[0], seen[2], rtol=0, atol=0)
    torch.testing.assert_close(feats.hidden[1], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(feats.hidden[2], seen[1], rtol=0, atol=0)
    # block 0 is a VACE layer: its captured state includes the hint
    assert not torch.equal(feats.hidden[1], m.dit.blocks[0](
        *_block0_inputs(m, x, t, ctx)))
    # time embedding is e = time_embedding(sinusoid(t))
    with torch.no_grad():
        e = m.dit.time_embedding(sinusoidal_embedding_1d(m.dit.freq_dim, t))
    torch.testing.assert_close(feats.time_emb, e)
    # head(last hidden) reproduces the velocity
    with torch.no_grad():
        v_last = m.dit.unpatchify(m.dit.head(feats.hidden[3], e), feats.grid)
    torch.testing.assert_close(v_last, v, rtol=0, atol=0)
    v_plain = m(x, t, ctx, vc)
    torch.testing.assert_close(v_plain, v, rtol=0, atol=0)


def _block0_inputs(m, x, t, ctx):
    with torch.no_grad():
        e = m.dit.time_embedding(sinusoidal_embedding_1d(m.dit.freq_dim, t))
        t_mod = m.dit.time_projection(e).unflatten(1, (6, m.dit.dim))
        c = m.dit.text_embedding(ctx)
        tok = m.dit.patch_embedding(x).flatten(2).transpose(1, 2)
        f, h, w = 3, 2, 3
        freqs = torch.cat([
            m.dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            m.dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            m.dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)
        ], dim=-1).reshape(f * h * w, 1, -1)
    return tok, c, t_mod, freqs


def test_predict_x0(vace_model):
    x, t, ctx, vc = _inputs(2)
    with torch.no_grad():
        v = vace_model(x, t, ctx, vc)
        x0 = vace_model.predict_x0(x, t, ctx, vc)
        x0f, feats = vace_model.predict_x0(x, t, ctx, vc, return_hidden_at=[1])
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x0, x - sigma * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, x0_from_velocity(x, v, t))
    torch.testing.assert_close(x0f, x0)
    assert len(feats.hidden) == 1


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(3)
    m = WanVACEScore('tiny-vace').train()
    x, t, ctx, vc = _inputs(2)
    x.requires_grad_(True)

    def grads(enabled):
        m.zero_grad(set_to_none=True)
        x.grad = None
        m.enable_gradient_checkpointing(enabled)
        calls = []
        block = m.dit.blocks[1]
        plain_forward = block.forward

        def counting_forward(*args):  # forward hooks do not fire on recompute
            calls.append(1)
            return plain_forward(*args)

        block.forward = counting_forward
        try:
            v, feats = m(x, t, ctx, vc, return_hidden_at=(1, ))
            (v.square().mean() + feats.hidden[0].mean()).backward()
        finally:
            del block.forward
        g = {n: p.grad.clone() for n, p in m.named_parameters()}
        return g, x.grad.clone(), len(calls)

    g0, gx0, calls0 = grads(False)
    g1, gx1, calls1 = grads(True)
    assert calls0 == 1 and calls1 == 2  # block really recomputed in backward
    assert g0.keys() == g1.keys()
    assert all(g0[k].abs().sum() > 0 for k in ('dit.blocks.3.ffn.0.weight',
                                               'vace.vace_blocks.1.after_proj'
                                               '.weight'))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda s, k=k: f'{k}: {s}')
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_runs_and_casts_timestep():
    torch.manual_seed(4)
    m = WanVACEScore('tiny-vace', dtype='bfloat16').eval()
    x, t, ctx, vc = _inputs(1)
    with torch.no_grad():
        v = m(x, t, ctx, vc)  # float32 inputs, bf16 network
        ref = model_fn_wan_video(dit=m.dit, vace=m.vace,
                                 latents=x.bfloat16(),
                                 timestep=t.bfloat16(),
                                 context=ctx.bfloat16(),
                                 vace_context=vc.bfloat16())
    assert v.dtype == torch.bfloat16
    torch.testing.assert_close(v, ref, rtol=0, atol=0)


def _diffsynth_config(model_hash, model_name):
    from diffsynth.configs.model_configs import wan_series
    for entry in wan_series:
        if (entry['model_hash'] == model_hash
                and entry['model_name'] == model_name):
            return entry.get('extra_kwargs', {})
    raise AssertionError(f'no diffsynth config {model_hash} {model_name}')


# model hashes of diffsynth 2.1.12's configs/model_configs.py
_HASH = {
    'wan2.1-t2v-1.3b': '9269f8db9040a9d860eaca435be61814',
    'wan2.1-t2v-14b': 'aafcfd9672c3a2456dc46e1cb6e52c70',
    'wan2.1-vace-1.3b': 'a61453409b67cd3246cf0c3bebad47ba',
    'wan2.1-vace-14b': '7a513e1f257a861512b1afd387a8ecd9',
}


@pytest.mark.parametrize('preset', sorted(_HASH))
def test_real_presets_match_diffsynth_configs(preset):
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vace import VaceWanModel
    m = WanVACEScore(preset, device='meta')
    assert next(m.parameters()).device.type == 'meta'
    cfg = _diffsynth_config(_HASH[preset], 'wan_video_dit')
    for k in ('dim', 'ffn_dim', 'num_heads', 'num_layers', 'text_dim',
              'freq_dim', 'in_dim', 'out_dim', 'eps'):
        assert m.arch[k] == cfg[k], k
    assert m.arch['patch_size'] == tuple(cfg['patch_size'])
    with skip_model_initialization():
        ref_dit = WanModel(**cfg)
    assert count_parameters(m.dit) == count_parameters(ref_dit)
    n = count_parameters(m.dit)
    if '14b' in preset:
        assert 13.9e9 < n < 14.4e9, n  # Wan2.1-14B: ~14.0e9
    else:
        assert 1.38e9 < n < 1.45e9, n  # Wan2.1-1.3B: ~1.42e9
    if 'vace' in preset:
        vcfg = _diffsynth_config(_HASH[preset], 'wan_video_vace')
        with skip_model_initialization():
            ref_vace = VaceWanModel(**vcfg)
        assert m.vace_layers == tuple(ref_vace.vace_layers)
        assert count_parameters(m.vace) == count_parameters(ref_vace)
    else:
        assert m.vace is None


def test_preset_overrides_and_registry():
    m = MODELS.build(dict(type='WanVACEScore', preset='wan2.1-vace-14b',
                          dim=24, ffn_dim=32, num_heads=2, num_layers=3,
                          text_dim=16, freq_dim=8, vace_layers=(0, 2)))
    assert (m.dim, m.num_layers, m.vace_layers) == (24, 3, (0, 2))
    assert m.dit.text_embedding[0].in_features == 16
    t2v = WanVACEScore('tiny-vace', vace_layers=())
    assert not t2v.has_vace and t2v.vace_layers == ()
    assert set(PRESETS) >= {'tiny', 'tiny-vace', 'wan2.1-t2v-1.3b',
                            'wan2.1-t2v-14b', 'wan2.1-vace-1.3b',
                            'wan2.1-vace-14b'}


@pytest.mark.parametrize('kwargs, match', [
    (dict(preset='wan2.2-foo'), 'unknown preset'),
    (dict(preset=None, dim=48), 'missing architecture field'),
    (dict(preset='tiny', vace_layers=(1, 2)), 'vace_layers must start at 0'),
    (dict(preset='tiny', vace_layers=(0, 4)), r'vace_layers.*\[0, num_layers=4\)'),
    (dict(preset='tiny', vace_layers=(0, 2, 1)), 'strictly increasing'),
    (dict(preset='tiny', dim=32, num_heads=2), r'head dim.*16'),
    (dict(preset='tiny', num_heads=5), 'divisible by num_heads'),
    (dict(preset='tiny', freq_dim=31), 'freq_dim must be even'),
    (dict(preset='tiny', dtype='float99'), 'dtype'),
])
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WanVACEScore(**kwargs)


def test_forward_errors(t2v_model, vace_model):
    x, t, ctx, vc = _inputs(1)
    with pytest.raises(ValueError, match='no VACE blocks'):
        t2v_model(x, t, ctx, vc)
    with pytest.raises(ValueError, match=r'x_t must be \[B, 16'):
        vace_model(x[:, :8], t, ctx)
    with pytest.raises(ValueError, match='divisible by patch_size'):
        vace_model(x[..., :5], t, ctx)
    with pytest.raises(ValueError, match='vace_context must be'):
        vace_model(x, t, ctx, vc[:, :64])
    with pytest.raises(ValueError, match='context must be'):
        vace_model(x, t, ctx[..., :16])
    with pytest.raises(ValueError, match='return_hidden_at'):
        vace_model(x, t, ctx, return_hidden_at=(4, ))
