"""Tiny Wan VAE / text encoder: real diffsynth classes built small."""
import math
import os

import pytest
import torch

from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE, WordTokenizer, recon_psnr, train_tiny_vae
from vdot_ext.utils import NonFiniteError, UnsafeCheckpointError, save_torch

VOCAB = ['a', 'red', 'blue', 'circle', 'square', 'moving', 'left', 'on', 'background']


def _videos(n=2, t=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth random videos: low-res noise upsampled (learnable by a tiny VAE)
    low = torch.rand(n, 3, t, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(t, size, size), mode='trilinear',
                                           align_corners=False)


@pytest.fixture(scope='module')
def vae():
    return TinyWanVAE(dim=8, seed=0)


def test_vae_is_wan_video_vae_with_small_inner_model(vae):
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
    assert isinstance(vae.wan_vae, WanVideoVAE)
    assert isinstance(vae.wan_vae.model, VideoVAE_)
    assert vae.wan_vae.model.dim == 8 and vae.wan_vae.z_dim == 16
    assert all(p.device.type == 'cpu' for p in vae.parameters())  # no meta leftovers
    assert not any(p.requires_grad for p in vae.parameters())
    assert not vae.wan_vae.model.training


def test_vae_shapes_and_range(vae):
    x = _videos(2, 9, 32)
    z = vae.encode(x)
    assert z.shape == (2, 16, 3, 4, 4)
    y = vae.decode(z)
    assert y.shape == (2, 3, 9, 32, 32)
    assert y.min() >= -1 and y.max() <= 1
    # a single image is a 1-frame video
    assert vae.encode(x[:, :, :1]).shape == (2, 16, 1, 4, 4)


@pytest.mark.parametrize('shape, field', [((1, 3, 8, 32, 32), '4k+1'),
                                          ((1, 3, 5, 40, 32), 'multiples of 16'),
                                          ((1, 4, 5, 32, 32), '[B, 3, T, H, W]'),
                                          ((3, 5, 32, 32), '[B, 3, T, H, W]')])
def test_vae_bad_shapes(vae, shape, field):
    with pytest.raises(ValueError, match=field.replace('[', r'\[').replace('+', r'\+')):
        vae.encode(torch.zeros(shape))


def test_vae_bad_latents(vae):
    with pytest.raises(ValueError, match='latents'):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))


def test_training_path_equals_inference_path(vae):
    """Batched VideoVAE_ encode/decode (training) == WanVideoVAE per-video loop."""
    x = _videos(2, 5, 32, seed=1)
    with torch.no_grad():
        z_train = vae.encode_with_grad(x)
        assert torch.allclose(z_train, vae.encode(x), atol=1e-5)
        assert torch.allclose(vae.decode_with_grad(z_train).clamp(-1, 1), vae.decode(z_train),
                              atol=1e-5)


def test_latent_scale_is_applied_and_calibrated():
    vae = TinyWanVAE(dim=8, seed=3)
    x = _videos(4, 5, 32, seed=2)
    raw = vae.encode(x)
    vae.set_latent_scale(torch.full((16, ), 0.5), torch.full((16, ), 2.0))
    assert torch.allclose(vae.encode(x), (raw - 0.5) / 2.0, atol=1e-5)
    vae.calibrate_latent_scale(x)
    z = vae.encode(x).transpose(0, 1).reshape(16, -1)
    assert torch.allclose(z.mean(1), torch.zeros(16), atol=1e-4)
    assert torch.allclose(z.std(1), torch.ones(16), atol=1e-3)
    with pytest.raises(ValueError, match='std'):
        vae.set_latent_scale(torch.zeros(16), torch.zeros(16))


def test_vae_deterministic_per_seed():
    a, b, c = TinyWanVAE(seed=5), TinyWanVAE(seed=5), TinyWanVAE(seed=6)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_training_reduces_loss_and_refreezes():
    vae = TinyWanVAE(dim=8, seed=0)
    x = _videos(8, 5, 32, seed=4)
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    result = train_tiny_vae(vae, x, steps=30, lr=3e-3, batch_size=4, clip_frames=5,
                            log_every=0, seed=0)
    assert result['last_loss'] < 0.8 * result['first_loss']
    assert result['final_recon_psnr'] > result['initial_recon_psnr']
    assert result['final_recon_psnr'] == pytest.approx(recon_psnr(vae, x))
    # recon_psnr's batched calls == the WanVideoVAE.encode/decode inference path
    mse = float(((vae.decode(vae.encode(x)) - x)**2).double().mean())
    assert recon_psnr(vae, x) == pytest.approx(10 * math.log10(4 / mse), abs=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in vae.model.state_dict().items())
    # frozen and eval again, like WanVideoVAE keeps it
    assert not any(p.requires_grad for p in vae.parameters())
    assert not vae.model.training


def test_decoder_only_training_keeps_the_latents():
    """decoder_only: conv2 + decoder improve, the encoder, conv1 and the latent scale stay bit-identical
    (models trained on the latents stay valid)."""
    vae = TinyWanVAE(dim=8, seed=0)
    x = _videos(8, 5, 32, seed=4)
    vae.init_for_training(x[:2])
    vae.set_latent_scale(torch.linspace(-0.1, 0.1, 16), torch.linspace(0.9, 1.1, 16))
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    latents = vae.encode(x[:2])
    result = train_tiny_vae(vae, x, steps=30, lr=3e-3, batch_size=4, clip_frames=5, log_every=0, seed=0,
                            decoder_only=True)
    assert result['final_recon_psnr'] > result['initial_recon_psnr']
    assert torch.equal(vae.encode(x[:2]), latents)
    changed = {k for k, v in vae.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(('decoder.', 'conv2.')) for k in changed), sorted(changed)[:5]
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.model.training


def test_init_for_training_lets_the_input_through():
    """Default init: the output hardly depends on the input; after
    init_for_training (zero residuals, LSUV) it does, with unit-std latents."""
    from diffsynth.models.wan_video_vae import ResidualBlock
    x = _videos(4, 5, 32, seed=8)

    def sensitivity(vae):
        with torch.no_grad():
            return float((vae.decode_with_grad(vae.encode_with_grad(x))
                          - vae.decode_with_grad(vae.encode_with_grad(-x))).abs().mean())

    vae = TinyWanVAE(dim=8, seed=0)
    before = sensitivity(vae)
    vae.init_for_training(x[:2])
    after = sensitivity(vae)
    assert after > 5 * before
    with torch.no_grad():
        assert 0.8 < float(vae.encode_with_grad(x[:2]).std()) < 1.2
    for block in (m for m in vae.model.modules() if isinstance(m, ResidualBlock)):
        assert block.residual[-1].weight.abs().sum() == 0
    assert not any(p.requires_grad for p in vae.parameters())


def test_train_rejects_bad_clip_frames():
    vae = TinyWanVAE(dim=8)
    with pytest.raises(ValueError, match='clip_frames'):
        train_tiny_vae(vae, _videos(2, 5, 32), steps=1, clip_frames=4)


def test_vae_save_load_roundtrip(tmp_path, vae):
    x = _videos(1, 5, 32, seed=7)
    vae.set_latent_scale(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    path = vae.save(str(tmp_path / 'vae.pth'))
    loaded = TinyWanVAE.load(path)
    assert torch.equal(loaded.latent_mean, vae.latent_mean)
    assert torch.equal(loaded.encode(x), vae.encode(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.save({'kind': 'something else'}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='not a TinyWanVAE checkpoint'):
        TinyWanVAE.load(str(tmp_path / 'bad.pth'))


def test_word_tokenizer():
    tok = WordTokenizer(VOCAB + ['red'], max_length=6)
    assert tok.vocab_size == 3 + len(VOCAB)  # duplicates dropped
    ids, mask = tok(['A red circle', 'a purple circle moving left on a blue background'],
                    return_mask=True)
    assert ids.shape == mask.shape == (2, 6)
    red, circle, a = tok.stoi['red'], tok.stoi['circle'], tok.stoi['a']
    assert ids[0].tolist() == [a, red, circle, 1, 0, 0]  # <eos> then <pad>
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[1, 1].item() == 2  # 'purple' is unknown
    assert ids[1, -1].item() == 1 and mask[1].sum() == 6  # truncated, still ends with <eos>
    assert tok('')[0].tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match='vocabulary'):
        WordTokenizer(['two words'])


def test_text_encoder_matches_diffsynth_prompt_embedder():
    """Same as diffsynth's WanVideoUnit_PromptEmbedder.encode_prompt on a real
    WanVideoPipeline carrying the tiny tokenizer/encoder (batch 1, as the pipeline calls it)."""
    from diffsynth.pipelines.wan_video import WanVideoPipeline, WanVideoUnit_PromptEmbedder
    enc = TinyTextEncoder(VOCAB, max_length=12, seed=0)
    pipe = WanVideoPipeline(device='cpu', torch_dtype=torch.float32)
    pipe.tokenizer = enc.tokenizer
    pipe.text_encoder = enc.encoder
    unit = WanVideoUnit_PromptEmbedder()
    prompts = ['a red circle moving left', 'a blue square on a red background', '']
    for prompt in prompts:
        with torch.no_grad():
            expected = unit.encode_prompt(pipe, prompt)
        got = enc.encode([prompt])
        assert got.shape == (1, 12, 32)
        assert torch.allclose(got, expected, atol=1e-6)
    # batched == per prompt, zero past each prompt's own length
    batch = enc.encode(prompts)
    for i, prompt in enumerate(prompts):
        assert torch.allclose(batch[i], enc.encode([prompt])[0], atol=1e-5)
    lengths = enc.tokenizer(prompts, return_mask=True)[1].sum(1)
    for i, n in enumerate(lengths):
        assert batch[i, n:].abs().sum() == 0 and batch[i, :n].abs().sum() > 0


def test_text_encoder_frozen_deterministic_save_load(tmp_path):
    a, b = TinyTextEncoder(VOCAB, seed=1), TinyTextEncoder(VOCAB, seed=1)
    c = TinyTextEncoder(VOCAB, seed=2)
    p = ['a red circle']
    assert torch.equal(a.encode(p), b.encode(p))
    assert not torch.allclose(a.encode(p), c.encode(p))
    assert not any(q.requires_grad for q in a.parameters())
    a.train()
    assert not a.training and not a.encoder.training
    loaded = TinyTextEncoder.load(a.save(str(tmp_path / 'text.pth')))
    assert loaded.tokenizer.itos == a.tokenizer.itos
    assert torch.equal(loaded.encode(p), a.encode(p))


def test_registered_in_models():
    from vdot_ext.registry import MODELS
    vae = MODELS.build(dict(type='TinyWanVAE', dim=8))
    assert isinstance(vae, TinyWanVAE)
    enc = MODELS.build(dict(type='TinyTextEncoder', vocabulary=VOCAB, dim=24, dim_attn=24,
                            dim_ffn=48, num_heads=2))
    assert enc.encode(['a red circle']).shape == (1, 16, 24)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_codec_files_are_written_atomically_and_loaded_safely(tmp_path, vae):
    path = str(tmp_path / 'vae.pth')
    vae.save(path)
    good = open(path, 'rb').read()
    # a save that fails half-way (an unpicklable extra) leaves the old file whole
    with pytest.raises(Exception):
        vae.save(path, extra={'not_picklable': lambda: None})
    assert open(path, 'rb').read() == good
    assert sorted(os.listdir(tmp_path)) == ['vae.pth']
    # a crafted file is refused before any code runs
    marker = tmp_path / 'ran'
    payload = torch.load(path, weights_only=True)
    torch.save(dict(payload, extra={'x': _RunsCode(marker)}), tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='evil.pth.*system'):
        TinyWanVAE.load(str(tmp_path / 'evil.pth'))
    assert not marker.exists()
    # non-finite weights or latent statistics: an error naming the file
    nan = dict(payload, latent_std=payload['latent_std'].clone())
    nan['latent_std'][2] = float('nan')
    save_torch(nan, str(tmp_path / 'nan_vae.pth'))
    with pytest.raises(NonFiniteError, match='nan_vae.pth.*latent_std'):
        TinyWanVAE.load(str(tmp_path / 'nan_vae.pth'))
    enc = TinyTextEncoder(VOCAB, dim=24, dim_attn=24, dim_ffn=48, num_heads=2)
    text = torch.load(enc.save(str(tmp_path / 'text.pth')), weights_only=True)
    name = next(iter(text['state_dict']))
    text['state_dict'][name] = text['state_dict'][name].clone().fill_(float('inf'))
    save_torch(text, str(tmp_path / 'inf_text.pth'))
    with pytest.raises(NonFiniteError, match=rf'inf_text.pth.*{name}'):
        TinyTextEncoder.load(str(tmp_path / 'inf_text.pth'))
