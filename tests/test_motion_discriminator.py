"""MotionDiscriminator (MoGAN §4.3, Appendix A; docs/DESIGN.md §13): the flow stack (Eq. 32), taps against
depth, initialisation from the teacher's first N blocks, t* = 0 and the fixed prompt, heads, checkpointing."""
import pytest
import torch

from vdot_ext.models.motion_discriminator import MOTION_PROMPT, MotionDiscriminator, encode_motion_prompt, flow_stack
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.registry import MODELS
from vdot_ext.utils import save_safetensors

HEAD_KW = dict(head_attn_dim=24, head_attn_heads=2)


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return WanVACEScore('tiny').eval()  # dim 48, 2 heads (head dim 24), 4 blocks, text_dim 32


@pytest.fixture(scope='module')
def prompt():
    torch.manual_seed(1)
    return torch.randn(1, 6, 32)


def tiny_disc(teacher, prompt, num_blocks=3, taps=(1, 2), **kw):
    torch.manual_seed(2)
    return MotionDiscriminator.from_score(teacher, prompt, num_blocks=num_blocks, taps=taps,
                                          **dict(HEAD_KW, **kw))


def test_flow_stack_duplicates_last_flow_and_appends_magnitude():
    flows = torch.randn(2, 4, 2, 8, 8)
    stack = flow_stack(flows)
    assert stack.shape == (2, 5, 3, 8, 8)
    torch.testing.assert_close(stack[:, :4, :2], flows)
    torch.testing.assert_close(stack[:, 4, :2], flows[:, 3])
    torch.testing.assert_close(stack[:, :, 2], stack[:, :, :2].square().sum(dim=2).sqrt())
    # a static region (zero flow) must not give NaN gradients through the magnitude
    zero = torch.zeros(1, 2, 2, 4, 4, requires_grad=True)
    flow_stack(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize('taps, num_blocks, message', [
    ((), 3, 'empty'),
    ((1, 3), 3, r'outside \[0, num_blocks=3\)'),
    ((-1, 2), 3, 'outside'),
    ((2, 2), 3, 'duplicates'),
    ((0, 1), 3, 'never be used'),
    ((True, 2), 3, 'outside'),
])
def test_taps_are_validated_against_depth(teacher, prompt, taps, num_blocks, message):
    with pytest.raises(ValueError, match=message):
        MotionDiscriminator(prompt, 'tiny', num_blocks=num_blocks, taps=taps, **HEAD_KW)


def test_paper_setting_taps_for_1_3b():
    assert MotionDiscriminator.validate_taps((7, 13, 15), 16) == (7, 13, 15)
    with pytest.raises(ValueError, match='never be used'):
        MotionDiscriminator.validate_taps((7, 13, 15), 30)


def test_init_copies_the_teachers_first_blocks_and_embeddings(teacher, prompt):
    disc = tiny_disc(teacher, prompt)
    assert len(disc.blocks) == 3
    for i, block in enumerate(disc.blocks):
        for (name, mine), theirs in zip(block.state_dict().items(), teacher.dit.blocks[i].state_dict().values()):
            torch.testing.assert_close(mine, theirs, msg=f'block {i} {name}')
    for name in ('time_embedding', 'time_projection', 'text_embedding'):
        for mine, theirs in zip(getattr(disc, name).parameters(), getattr(teacher.dit, name).parameters()):
            torch.testing.assert_close(mine, theirs)
    with pytest.raises(ValueError, match='only 4 blocks'):
        MotionDiscriminator(prompt, 'tiny', num_blocks=5, taps=(4,), **HEAD_KW).init_from_score(teacher)
    with pytest.raises(ValueError, match='ffn_dim'):
        MotionDiscriminator(prompt, 'tiny', ffn_dim=192, num_blocks=2, taps=(1,), **HEAD_KW).init_from_score(teacher)


def test_backbone_runs_the_teacher_blocks_at_t0_with_the_fixed_prompt(teacher, prompt):
    """The hidden states at the taps equal the teacher's blocks run by hand with t = 0 and context = the
    prompt embedding (diffsynth's WanModel composition, as WanVACEScore.forward does it)."""
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d
    disc = tiny_disc(teacher, prompt)
    captured, head_inputs = {}, {}
    for i in disc.taps:
        disc.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
    for k, head in enumerate(disc.heads):  # head k reads the hidden states after block taps[k]
        head.register_forward_pre_hook(lambda m, args, k=k: head_inputs.__setitem__(disc.taps[k], args[0]))
    flows = torch.randn(2, 4, 2, 32, 32)
    disc(flows)
    assert set(head_inputs) == set(disc.taps)
    for tap in disc.taps:
        assert head_inputs[tap] is captured[tap], f'the head of tap {tap} reads another block'
    tokens, (f, h, w) = disc.embed(flows)
    assert (f, h, w) == (2, 2, 2)  # 5 frames padded in front to 8 = 2 × 4; 32 / 16 = 2
    dit = teacher.dit
    t_emb = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, torch.zeros(2)))
    t_mod = dit.time_projection(t_emb).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(prompt).expand(2, -1, -1)
    freqs = torch.cat([dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    x = tokens
    for i in range(3):
        x = dit.blocks[i](x, context, t_mod, freqs)
        if i in disc.taps:
            torch.testing.assert_close(captured[i], x, msg=f'tap {i}')


def test_patch_embedding_pads_time_causally(teacher, prompt):
    disc = tiny_disc(teacher, prompt)
    flows = torch.randn(1, 4, 2, 32, 32)
    tokens, grid = disc.embed(flows)
    manual = flow_stack(flows).transpose(1, 2)
    manual = torch.cat((manual[:, :, :1].expand(-1, -1, 3, -1, -1), manual), dim=2)  # 5 → 8 frames
    expected = disc.patch_embedding(manual).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected)
    # 8 frames (a window starting after chunk 0: 4L frames) need no padding
    assert disc.embed(torch.randn(1, 7, 2, 32, 32))[1] == (2, 2, 2)
    with pytest.raises(ValueError, match='divisible by the patch size'):
        disc(torch.randn(1, 4, 2, 24, 32))


def test_heads_use_one_auxiliary_token_and_logits_depend_on_every_tap(teacher, prompt):
    disc = tiny_disc(teacher, prompt)
    assert len(disc.heads) == len(disc.taps) == 2
    for head in disc.heads:
        assert head.attention.register_tokens.shape == (1, 24)
    flows = torch.randn(3, 4, 2, 32, 32)
    logits = disc(flows)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    logits.sum().backward()
    for i, head in enumerate(disc.heads):
        assert head.attention.register_tokens.grad.abs().sum() > 0, f'head {i} gets no gradient'
    for i, block in enumerate(disc.blocks):
        assert block.self_attn.q.weight.grad.abs().sum() > 0, f'block {i} gets no gradient'
    assert disc.patch_embedding.weight.grad.abs().sum() > 0
    # different motion, different logits; the same input, the same logit (t* = 0: deterministic)
    torch.testing.assert_close(disc(flows), disc(flows))
    assert not torch.allclose(disc(flows), disc(flows + 1.0))


def test_gradient_checkpointing_matches(teacher, prompt):
    flows = torch.randn(2, 4, 2, 32, 32)
    plain = tiny_disc(teacher, prompt).train()
    ckpt = tiny_disc(teacher, prompt, gradient_checkpointing=True).train()
    out_plain, out_ckpt = plain(flows), ckpt(flows)
    torch.testing.assert_close(out_plain, out_ckpt)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_prompt_embedding_buffer_from_file_and_checks(teacher, prompt, tmp_path):
    path = str(tmp_path / 'good_motion.safetensors')
    save_safetensors({'prompt_embedding': prompt[0]}, path)
    disc = MODELS.build(dict(type='MotionDiscriminator', prompt_embedding=path, preset='tiny', num_blocks=2,
                             taps=(0, 1), **HEAD_KW))
    torch.testing.assert_close(disc.prompt_embedding, prompt)
    assert 'prompt_embedding' in disc.state_dict()
    assert not any(disc.prompt_embedding is p for p in disc.parameters())
    with pytest.raises(ValueError, match='text_dim 32'):
        MotionDiscriminator(torch.randn(6, 16), 'tiny', num_blocks=2, taps=(0, 1), **HEAD_KW)
    with pytest.raises(ValueError, match='NaN'):
        MotionDiscriminator(torch.full((6, 32), float('nan')), 'tiny', num_blocks=2, taps=(0, 1), **HEAD_KW)
    with pytest.raises(ValueError, match='missing architecture'):
        MotionDiscriminator(prompt, num_blocks=2, taps=(0, 1))


def test_pretrained_release_initialises_the_backbone(tmp_path, prompt):
    from real_layout import tiny_vace_release
    teacher, files = tiny_vace_release(str(tmp_path / 'wan'), preset='tiny', seed=3)
    disc = MotionDiscriminator(prompt, 'tiny', num_blocks=2, taps=(0, 1), pretrained=files, **HEAD_KW)
    for i in range(2):
        torch.testing.assert_close(disc.blocks[i].ffn[0].weight, teacher.dit.blocks[i].ffn[0].weight)
    torch.testing.assert_close(disc.text_embedding[0].weight, teacher.dit.text_embedding[0].weight)


def test_encode_motion_prompt_uses_the_text_encoder():
    from vdot_ext.models.tiny_codecs import TinyTextEncoder
    encoder = TinyTextEncoder(vocabulary=MOTION_PROMPT.split())
    emb = encode_motion_prompt(encoder)
    torch.testing.assert_close(emb, encoder.encode([MOTION_PROMPT]))
    assert emb.shape == (1, 16, 32)
