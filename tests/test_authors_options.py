"""The authors' values as options (docs/DESIGN.md §12), the generator's gradient statistics and the
parity / balanced weighting of OTD and DMD (docs/DESIGN.md §5)."""
import pytest
import torch

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.models.flow_matching import add_noise, shift_timesteps
from vdot_ext.models.vdot_distiller import distribution_matching_gradients, gradient_stats
from vdot_ext.registry import MODELS

B, F, H, W, L = 2, 2, 8, 8, 6


def build_distiller(**overrides):
    cfg = dict(
        type='VDOTDistiller',
        real_score=dict(type='WanVACEScore', preset='tiny'),
        discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3),
                           bottleneck_dim=24, num_heads=2, use_time_emb=True),
        otd_loss=dict(type='OTDLoss', num_iters=30, tol=None, pool_kernel=2, normalize='none'),
        dmd_loss=dict(type='DMDLoss'),
        gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
        use_vace_context=False, guidance_scale=3.0, uncond='zeros', seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def build_optim(model):
    role = dict(type='OptimWrapper',
                optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0))
    return RoleOptimWrapperConstructor({name: dict(role) for name in model.trainable_roles()})(model)


def batch(negative=False):
    g = torch.Generator().manual_seed(1)
    data = dict(context=torch.randn(B, L, 32, generator=g), latents=torch.randn(B, 16, F, H, W, generator=g))
    if negative:
        data['negative_context'] = torch.randn(B, L, 32, generator=g)
    return data


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, before):
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------
# GAN critic step
# ----------------------------------------------------------------------
@pytest.mark.parametrize('trains, fake_score_changes', [('fake_score_and_heads', True), ('heads', False)])
def test_gan_critic_step_trains_what_the_option_says(trains, fake_score_changes):
    """Public code: the discriminator loss trains the whole fake score and the heads; Algorithm 1
    line 22: the heads only."""
    model = build_distiller(gan_critic_trains=trains, otd_loss=None)
    optim = build_optim(model)
    model.iteration.fill_(1)                    # odd k, k % gen_every != 0: the critic's GAN step only
    before = {name: state(getattr(model, name)) for name in ('generator', 'fake_score', 'discriminator')}
    fake_score_trainable = []
    handle = model.discriminator.register_forward_pre_hook(lambda mod, args: fake_score_trainable.append(
        any(p.requires_grad for p in model.fake_score.parameters())))
    log = model.train_step(batch(), optim)
    handle.remove()
    assert [(s.role, s.objective) for s in model.schedule_trace[-1].steps] == [('critic', 'gan')]
    assert 'loss_critic_gan' in log
    assert set(fake_score_trainable) == {fake_score_changes}     # 'heads' freezes the fake score
    assert changed(model.discriminator, before['discriminator'])
    assert changed(model.fake_score, before['fake_score']) == fake_score_changes
    assert not changed(model.generator, before['generator'])
    with pytest.raises(ValueError, match=r'model\.gan_critic_trains'):
        build_distiller(gan_critic_trains='all')


@pytest.mark.parametrize('shared', [True, False])
def test_gan_critic_pairs_share_their_noise(shared):
    """With shared noise (public critic_loss) a fake sample equal to the real one is noised identically."""
    model = build_distiller(gan_critic_shared_noise=shared, otd_loss=None)
    cond = model._conditions(batch())
    torch.manual_seed(5)
    x0 = model.rollout(cond, exit_step=1)          # critic_losses draws the rollout first
    cond['real_latents'] = x0
    seen = []
    handle = model.fake_score.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    torch.manual_seed(5)
    model.critic_losses(cond, 'gan', exit_step=1)
    handle.remove()
    x_t_fake, x_t_real = seen
    assert torch.equal(x_t_fake, x_t_real) == shared


# ----------------------------------------------------------------------
# timesteps
# ----------------------------------------------------------------------
def test_score_timesteps_public_minimum_is_shift_of_min_t():
    """Public stage 2 (bi_dmd_gan.py): randint(20, 980), shift 5, clamp(20, 980): never below
    shift_5(20) ≈ 92.6. 'after_shift' reaches min_t; GAN timesteps reach min_t in both."""
    public_min = float(shift_timesteps(torch.tensor(20.0), 5.0))
    assert abs(public_min - 92.59) < 0.01
    torch.manual_seed(0)
    before = build_distiller(score_t_clamp='before_shift', otd_loss=None, dmd_loss=None,
                             gan_loss=None, discriminator=None)
    t = before.sample_t(20000, 'score')
    assert public_min - 1e-3 <= float(t.min()) < public_min + 1.0 and float(t.max()) == 980.0
    # the draw is uniform on [20, 980) before the shift: invert the shift and look at the mean
    u = t / (5.0 - 4.0 * t / 1000.0)                  # shift_5⁻¹(t) = t / (s − (s − 1)·t/1000)
    unclamped = u[t < 980.0]
    top = 980.0 / (5.0 - 4.0 * 0.98)                 # shift_5⁻¹(980): above it the clamp bites
    assert float(unclamped.min()) >= 20.0 - 1e-2 and abs(float(unclamped.mean()) - (20.0 + top) / 2) < 10.0
    after = build_distiller(score_t_clamp='after_shift', otd_loss=None, dmd_loss=None,
                            gan_loss=None, discriminator=None)
    assert float(after.sample_t(20000, 'score').min()) == 20.0
    assert float(before.sample_t(20000, 'gan').min()) == 20.0
    with pytest.raises(ValueError, match='min_t < max_t'):
        build_distiller(min_t=500.0, max_t=400.0)


# ----------------------------------------------------------------------
# the unconditional branch
# ----------------------------------------------------------------------
def test_uncond_negative_prompt_is_required_and_used():
    model = build_distiller(uncond='negative_prompt', guidance_scale=4.0)
    with pytest.raises(KeyError, match=r"uncond='negative_prompt'.*no 'negative_context'.*uncond='zeros'"):
        model._conditions(batch())
    data = batch(negative=True)
    cond = model._conditions(data)
    x_t = torch.randn(B, 16, F, H, W)
    t = torch.full((B, ), 600.0)
    with torch.no_grad():
        got = model.teacher_x0(x_t, t, cond)
        v_c = model.real_score(x_t, t, data['context'], None)
        v_n = model.real_score(x_t, t, data['negative_context'], None)
        v_0 = model.real_score(x_t, t, torch.zeros_like(data['context']), None)
    torch.testing.assert_close(got, x_t - 0.6 * (v_n + 4.0 * (v_c - v_n)), rtol=1e-5, atol=1e-5)
    # 'zeros' is the all-zero embedding, whatever the batch carries
    zeros = build_distiller(uncond='zeros', guidance_scale=4.0)
    with torch.no_grad():
        got = zeros.teacher_x0(x_t, t, zeros._conditions(data))
    torch.testing.assert_close(got, x_t - 0.6 * (v_0 + 4.0 * (v_c - v_0)), rtol=1e-5, atol=1e-5)
    # without CFG no unconditional branch is needed
    assert build_distiller(uncond='negative_prompt', guidance_scale=1.0)._conditions(batch())[
        'negative_context'] is None
    bad = batch(negative=True)
    bad['negative_context'] = bad['negative_context'][:, :, :16]
    with pytest.raises(ValueError, match='negative_context'):
        model._conditions(bad)
    with pytest.raises(ValueError, match=r'model\.uncond'):
        build_distiller(uncond='empty')


# ----------------------------------------------------------------------
# what a generator step logs, and that measuring it changes nothing
# ----------------------------------------------------------------------
def test_generator_step_is_exactly_the_chain_rule_of_its_terms():
    """The terms are evaluated at a detached copy of x̂0 and applied through ⟨x̂0, sg(g)⟩: the generator's
    parameter gradients equal those of back-propagating 0.8·L_OTD + 0.2·L_DMD through x̂0 directly (parity:
    the public code's sum of the two losses)."""
    model = build_distiller(dm_weighting='parity',
                            otd_loss=dict(type='OTDLoss', num_iters=30, tol=None, pool_kernel=2, normalize='l2_frame'))
    model.generator.requires_grad_(True)
    cond = model._conditions(batch())
    torch.manual_seed(7)
    losses, stats = model.generator_losses(cond, 'dm', exit_step=2)
    sum(losses.values()).backward()
    ours = [p.grad.clone() for p in model.generator.parameters()]
    model.generator.zero_grad(set_to_none=True)

    torch.manual_seed(7)                                   # the same draws, the old way
    x0 = model.rollout(cond, 2, grad=True)
    t = model.sample_t(B, 'score')
    x_t = add_noise(x0.detach(), torch.randn_like(x0), t)
    with torch.no_grad():
        fake = model._score_x0(model.fake_score, x_t, t, cond).float()
        real = model.teacher_x0(x_t, t, cond)
    direct = 0.8 * model.otd_loss(x0, fake, real) + 0.2 * model.dmd_loss(x0, fake, real, t)
    direct.backward()
    for p, g in zip(model.generator.parameters(), ours):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)

    # the OTD surrogate is not presented as a loss; the gradient statistics are logged
    assert set(losses) == {'surrogate_gen_otd', 'loss_gen_dmd'}
    for key in ('gen_x_grad_norm_otd', 'gen_x_grad_norm_dmd', 'gen_x_share_otd', 'gen_x_share_dmd',
                'gen_x_cos_otd_dmd', 'otd_grad_norm', 'otd_w_eps', 'otd_col_err', 'dmd_grad_norm'):
        assert key in stats, key
    assert abs(stats['gen_x_share_otd'] + stats['gen_x_share_dmd'] - 1.0) < 1e-6
    # parity: OTD's step on x is w·c·ĝ with ‖ĝ‖ = 1 per batch element and frame
    assert abs(stats['gen_x_grad_norm_otd'] - 0.8 * 0.1 * (B * F) ** 0.5) < 1e-4

    losses, stats = model.generator_losses(cond, 'gan', exit_step=1)
    assert set(losses) == {'loss_gen_gan'} and stats['gen_x_grad_norm_gan'] > 0


def test_gradient_stats_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    stats = gradient_stats(dict(otd=a, dmd=b))
    na, nb = float(a.norm()), float(b.norm())
    assert abs(stats['gen_x_grad_norm_otd'] - na) < 1e-6 and abs(stats['gen_x_share_dmd'] - nb / (na + nb)) < 1e-6
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert abs(stats['gen_x_cos_otd_dmd'] - cos) < 1e-6
    assert gradient_stats(dict(otd=a, dmd=-a))['gen_x_cos_otd_dmd'] == pytest.approx(-1.0)


# ----------------------------------------------------------------------
# parity vs balanced
# ----------------------------------------------------------------------
def _clouds(seed=0, shape=(B, 16, F, H, W)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    real = torch.randn(shape, generator=g)
    direction = torch.randn(shape, generator=g)
    return x, real, direction


def _losses(normalize):
    otd = MODELS.build(dict(type='OTDLoss', epsilon=0.05, num_iters=200, tol=None, pool_kernel=2,
                            normalize=normalize, grad_scale=0.1))
    return otd, MODELS.build(dict(type='DMDLoss'))


def _step(weighting, x, fake, real, debias=True):
    otd, dmd = _losses('l2_frame' if weighting == 'parity' else 'none')
    t = torch.full((B, ), 500.0)
    _, grads, _ = distribution_matching_gradients(x, fake, real, t, otd, dmd, dict(otd=0.8, dmd=0.2),
                                                  weighting, ot_debias=debias)
    return grads


def test_when_fake_equals_real_balanced_ot_step_vanishes_parity_does_not():
    """Token clouds as tight as ε (as neighbouring tokens of smooth latents are): the entropic plan blurs
    each token over its neighbours, so the raw OT gradient at fake = real is small but not zero. Parity
    normalises it to a fixed-size step; balanced (Sinkhorn-divergence gradient) does not step at all."""
    x, real, _ = _clouds()
    real = 0.1 * real
    parity = _step('parity', x, real.clone(), real)
    balanced = _step('balanced', x, real.clone(), real)
    undebiased = _step('balanced', x, real.clone(), real, debias=False)
    # parity: the normalised OT step keeps its size, 0.8·0.1 per batch element and frame
    assert float(parity['otd'].norm()) == pytest.approx(0.8 * 0.1 * (B * F) ** 0.5, rel=1e-4)
    assert float(balanced['otd'].norm()) == 0.0                     # exactly 0
    assert float(parity['dmd'].norm()) == float(balanced['dmd'].norm()) == 0.0
    # without the debiasing the entropic self-bias is left; the debiased step removes it
    assert float(undebiased['otd'].norm()) > 0.0


def test_balanced_ot_step_shrinks_as_the_distributions_meet():
    x, real, direction = _clouds(1)
    parity_norms, balanced_norms = [], []
    for alpha in (1.0, 0.3, 0.1, 0.03):
        fake = real + alpha * direction
        parity_norms.append(float(_step('parity', x, fake, real)['otd'].norm()))
        balanced_norms.append(float(_step('balanced', x, fake, real)['otd'].norm()))
    assert max(parity_norms) - min(parity_norms) < 1e-4 * max(parity_norms)    # a fixed-size step
    ratios = [a / b for a, b in zip(balanced_norms, balanced_norms[1:])]
    assert all(r > 2.0 for r in ratios), (balanced_norms, ratios)             # ≈ 10/3 per 10/3 of α


def test_balanced_formula_and_dmd_term_unchanged():
    """Balanced: g_OT = w·N(H·W·(∇W_ε(a, b) − ∇W_ε(a, a)))/numel with DMD's normaliser N; the DMD term
    is the same in both modes."""
    x, real, direction = _clouds(2)
    fake = real + 0.5 * direction
    otd, dmd = _losses('none')
    t = torch.full((B, ), 500.0)
    _, grads, stats = distribution_matching_gradients(x, fake, real, t, otd, dmd, dict(otd=0.8, dmd=0.2),
                                                      'balanced')
    displacement = H * W * (otd.ot_gradient(fake, real) - otd.ot_gradient(fake, fake))
    n = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grads['otd'], 0.8 * displacement / n / x.numel(), rtol=1e-4, atol=1e-9)
    assert stats['otd_displacement_norm'] == pytest.approx(float(displacement.norm()), rel=1e-4)
    assert 'otd_step_norm' not in stats                # parity's step size is not what balanced applies
    parity = _step('parity', x, fake, real)
    torch.testing.assert_close(grads['dmd'], parity['dmd'])
    # the barycentric displacement of well-separated clouds at a small offset is the offset itself
    close = real + 1e-2 * direction
    pooled = torch.nn.functional.avg_pool3d(close - real, (1, 2, 2))
    got = H * W * (otd.ot_gradient(close, real) - otd.ot_gradient(close, close))
    torch.testing.assert_close(torch.nn.functional.avg_pool3d(got, (1, 2, 2)), pooled, rtol=0.05, atol=1e-4)


def test_balanced_in_the_model():
    """At initialisation the fake score is the teacher: without CFG, fake = real. Parity still steps the
    generator by the fixed OT size; balanced does not step at all."""
    for weighting, normalize in (('parity', 'l2_frame'), ('balanced', 'none')):
        model = build_distiller(guidance_scale=1.0, dm_weighting=weighting,
                                otd_loss=dict(type='OTDLoss', num_iters=30, tol=None, normalize=normalize))
        model.generator.requires_grad_(True)
        _, stats = model.generator_losses(model._conditions(batch()), 'dm', exit_step=1)
        if weighting == 'parity':
            # 0.08 per batch element and frame whose raw OT gradient (entropic blur) is not exactly 0
            assert stats['gen_x_grad_norm_otd'] >= 0.08 - 1e-6
        else:
            assert stats['gen_x_grad_norm_otd'] == 0.0
        assert stats['gen_x_grad_norm_dmd'] == 0.0
    assert build_distiller().dm_weighting == 'balanced'          # the default, chosen by the toy benchmark
    with pytest.raises(ValueError, match=r"otd_loss\.normalize='none'"):
        build_distiller(otd_loss=dict(type='OTDLoss', num_iters=30, tol=None, normalize='l2_frame'))
    with pytest.raises(ValueError, match=r'model\.dm_weighting'):
        build_distiller(dm_weighting='equal')
