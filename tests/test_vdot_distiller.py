"""VDOTDistiller: the Algorithm 1 + TTUR schedule, role updates, rollout, logging (docs/DESIGN.md §3, §6)."""
import pytest
import torch

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.models.vdot_distiller import Step, StepPlan, vdot_step_plan
from vdot_ext.registry import MODELS

B, F, H, W, L = 2, 3, 8, 8, 6


def build_distiller(**overrides):
    cfg = dict(
        type='VDOTDistiller',
        real_score=dict(type='WanVACEScore', preset='tiny-vace'),
        discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3),
                           bottleneck_dim=24, num_heads=2, use_time_emb=True),
        otd_loss=dict(type='OTDLoss', epsilon=0.1, num_iters=20, pool_kernel=2, normalize='none'),
        dmd_loss=dict(type='DMDLoss'),
        gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
        gen_every=5, guidance_scale=2.0, seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def build_optim(model, lr=1e-3):
    role = dict(type='OptimWrapper',
                optimizer=dict(type='AdamW', lr=lr, betas=(0.0, 0.999), weight_decay=0.0))
    return RoleOptimWrapperConstructor(
        {name: dict(role) for name in model.trainable_roles()})(model)


def batch(vace=True):
    g = torch.Generator().manual_seed(1)
    data = dict(context=torch.randn(B, L, 32, generator=g),
                latents=torch.randn(B, 16, F, H, W, generator=g),
                # the encoded negative prompt: the CFG's unconditional branch (uncond='negative_prompt')
                negative_context=torch.randn(B, L, 32, generator=g))
    if vace:
        data['vace_context'] = torch.randn(B, 96, F, H, W, generator=g)
    return data


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


# Hand-written from Algorithm 1 (objective parity) and TTUR 5 (docs/DESIGN.md §6).
EXPECTED_FULL = [
    (0, 'dm', 'denoise'), (1, None, 'gan'), (2, None, 'denoise'), (3, None, 'gan'),
    (4, None, 'denoise'), (5, 'gan', 'gan'), (6, None, 'denoise'), (7, None, 'gan'),
    (8, None, 'denoise'), (9, None, 'gan'), (10, 'dm', 'denoise'), (11, None, 'gan'),
    (12, None, 'denoise'), (13, None, 'gan'), (14, None, 'denoise'), (15, 'gan', 'gan'),
]


def test_step_plan_table():
    got = [(p.iteration, p.generator, p.critic)
           for p in (vdot_step_plan(k, 5, gan=True, dm=True) for k in range(16))]
    # the generator steps first, then the critic
    assert [s.role for s in vdot_step_plan(0, 5, True, True).steps] == ['generator', 'critic']
    assert got == EXPECTED_FULL
    # GAN off (stage 1): every generator step is distribution matching
    stage1 = [vdot_step_plan(k, 5, gan=False, dm=True) for k in range(11)]
    assert [p.generator for p in stage1] == ['dm', None, None, None, None] * 2 + ['dm']
    assert {p.critic for p in stage1} == {'denoise'}
    # DM off (GAN-only ablation): the generator never steps on even iterations
    gan_only = [vdot_step_plan(k, 1, gan=True, dm=False) for k in range(4)]
    assert [p.generator for p in gan_only] == [None, 'gan', None, 'gan']


def test_schedule_trace_and_which_roles_change():
    """Run 11 real iterations: the recorded trace follows Algorithm 1 and the
    parameters that change are exactly those of the role the plan names. The critic's
    GAN step trains the fake score too (gan_critic_trains='fake_score_and_heads', the
    public code; 'heads' is tested in test_authors_options.py)."""
    model = build_distiller()
    optim = build_optim(model)
    data = batch()
    teacher = snapshot(model.real_score)
    for k in range(11):
        gen, fake, disc = (snapshot(m) for m in
                           (model.generator, model.fake_score, model.discriminator))
        log = model.train_step(data, optim)
        plan = model.schedule_trace[-1]
        assert (plan.iteration, plan.generator, plan.critic) == EXPECTED_FULL[k]
        assert changed(model.generator, gen) == (plan.generator is not None), k
        assert changed(model.fake_score, fake), k                   # denoising and GAN critic steps
        assert changed(model.discriminator, disc) == (plan.critic == 'gan'), k
        # every loss term computed is logged
        expected = {'loss_critic_denoise'} if plan.critic == 'denoise' else {'loss_critic_gan'}
        expected |= {'nonfinite_skips_generator', 'nonfinite_skips_critic'}   # 0: all finite
        if plan.generator == 'dm':
            expected |= {'surrogate_gen_otd', 'loss_gen_dmd', 'otd_iters', 'otd_row_err',
                         'otd_col_err', 'otd_w_eps', 'otd_grad_norm', 'dmd_grad_norm',
                         'gen_x_grad_norm_otd', 'gen_x_grad_norm_dmd', 'gen_x_cos_otd_dmd',
                         'gen_x_share_otd', 'gen_x_share_dmd'}
        if plan.generator == 'gan':
            expected |= {'loss_gen_gan', 'gen_x_grad_norm_gan'}
        assert expected <= set(log), (k, sorted(log))
        assert 'loss_gen_otd' not in log          # the constant OTD surrogate is not a loss curve
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in log.values())
        assert float(log['nonfinite_skips_generator']) == float(log['nonfinite_skips_critic']) == 0
    assert not changed(model.real_score, teacher)
    assert int(model.iteration) == 11


def test_schedule_trace_keeps_only_the_last_plans(monkeypatch):
    """The trace is bounded: a long run keeps the last SCHEDULE_TRACE_LENGTH plans, not all of them."""
    from vdot_ext.models.vdot_distiller import VDOTDistiller
    monkeypatch.setattr(VDOTDistiller, 'SCHEDULE_TRACE_LENGTH', 3)
    model = build_distiller(otd_loss=None, discriminator=None, gan_loss=None)
    optim, data = build_optim(model), batch()
    for _ in range(5):
        model.train_step(data, optim)
    assert [plan.iteration for plan in model.schedule_trace] == [2, 3, 4]
    # nothing is left requiring grad between steps
    assert not any(p.requires_grad for p in model.parameters())


def test_iteration_counter_resumes_schedule():
    model = build_distiller()
    optim = build_optim(model)
    for _ in range(3):
        model.train_step(batch(), optim)
    restored = build_distiller()
    restored.load_state_dict(model.state_dict())
    restored.train_step(batch(), build_optim(restored))
    assert restored.schedule_trace[-1] == vdot_step_plan(3, 5, gan=True, dm=True)
    assert restored.schedule_trace[-1] == StepPlan(3, (Step('critic', 'gan'), ))


def test_exit_step_same_on_every_rank_and_varies():
    a, b = build_distiller(seed=7), build_distiller(seed=7)
    steps = [a.exit_step(k) for k in range(40)]
    assert steps == [b.exit_step(k) for k in range(40)]   # no communication needed
    assert set(steps) == {0, 1, 2, 3}


def test_rollout_gradient_only_at_exit_step():
    """Backward simulation: the exit step's forward carries the graph; the
    steps before run without gradients."""
    model = build_distiller()
    model.generator.requires_grad_(True)
    calls = []
    handle = model.generator.register_forward_hook(
        lambda mod, args, out: calls.append(torch.is_grad_enabled()))
    cond = model._conditions(batch())
    x0 = model.rollout(cond, exit_step=2, grad=True)
    handle.remove()
    assert calls == [False, False, True]
    assert x0.requires_grad and x0.shape == (B, 16, F, H, W)


def test_generator_timesteps_are_shifted():
    model = build_distiller()
    torch.testing.assert_close(model.generator_timesteps,
                               torch.tensor([1000.0, 937.5, 833.3333, 625.0]))


def test_teacher_cfg_formula():
    model = build_distiller(guidance_scale=4.0)
    cond = model._conditions(batch())
    x_t = torch.randn(B, 16, F, H, W)
    t = torch.full((B, ), 600.0)
    with torch.no_grad():
        got = model.teacher_x0(x_t, t, cond)
        v_c = model.real_score(x_t, t, cond['context'], cond['vace_context'])
        v_u = model.real_score(x_t, t, cond['negative_context'], cond['vace_context'])
    v = v_u + 4.0 * (v_c - v_u)
    torch.testing.assert_close(got, x_t - 0.6 * v, rtol=1e-5, atol=1e-5)


def test_stage1_t2v_without_vace_or_gan():
    model = build_distiller(real_score=dict(type='WanVACEScore', preset='tiny'),
                            discriminator=None, gan_loss=None, otd_loss=None,
                            use_vace_context=False, gen_every=2)
    optim = build_optim(model)
    logs = [model.train_step(batch(vace=False), optim) for _ in range(3)]
    assert 'loss_gen_dmd' in logs[0] and 'loss_gen_dmd' not in logs[1]
    assert all('loss_critic_denoise' in log for log in logs)


def test_teacher_weights_file_errors_name_the_problem(tmp_path):
    score = MODELS.build(dict(type='WanVACEScore', preset='tiny'))
    path = tmp_path / 'teacher.pth'
    sd = {f'score.{k}': v for k, v in score.state_dict().items()}
    sd['score.dit.head.head.weight'] = torch.zeros(3, 3)
    torch.save({'state_dict': sd}, path)
    weights = dict(checkpoint=str(path), prefix='score.')
    with pytest.raises(ValueError, match=r'shape mismatch .*dit\.head\.head\.weight'):
        build_distiller(real_score=dict(type='WanVACEScore', preset='tiny'),
                        real_score_weights=weights, discriminator=None, gan_loss=None,
                        use_vace_context=False)
    with pytest.raises(FileNotFoundError, match='real_score_weights'):
        build_distiller(real_score_weights=dict(checkpoint=str(tmp_path / 'none.pth')))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match='gen_every'):
        build_distiller(gen_every=0)
    with pytest.raises(ValueError, match='gan_loss and discriminator'):
        build_distiller(gan_loss=None)
    with pytest.raises(ValueError, match='dm_weights'):
        build_distiller(dm_weights=dict(kl=1.0))
    # a VACE generator cannot start from a T2V teacher: its VACE blocks would stay random
    with pytest.raises(ValueError, match=r'missing \[\d+\]: \[.vace\.'):
        build_distiller(real_score=dict(type='WanVACEScore', preset='tiny'),
                        generator=dict(type='WanVACEScore', preset='tiny-vace'),
                        discriminator=None, gan_loss=None)
    model = build_distiller()
    with pytest.raises(KeyError, match='vace_context'):
        model.train_step(batch(vace=False), build_optim(model))
    with pytest.raises(ValueError, match='roles'):
        RoleOptimWrapperConstructor(dict(generator=dict(
            optimizer=dict(type='AdamW', lr=1e-3))))(model)
