"""Step plans as config data (docs/DESIGN.md §6): Algorithm 1 + TTUR unchanged, cyclic plans, MoGAN's order."""
import pytest
import torch

from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.models.step_plans import (
    STEP_PLANS,
    CyclicStepPlan,
    Step,
    StepPlan,
    VDOTAlgorithm1,
    build_schedule,
    vdot_step_plan,
)
from vdot_ext.registry import MODELS

B, F, H, W, L = 1, 2, 8, 8, 6

# MoGAN paper, Appendix: (1) generator DMD step, (2) fake score for 4 iterations, (3) generator MoGAN
# step, (4) discriminator step. Today's objectives stand in for MoGAN's ('gan' for the motion GAN).
MOGAN_ORDER = [dict(role='generator', objective='dm'),
               dict(role='critic', objective='denoise', repeat=4),
               dict(role='generator', objective='gan'),
               dict(role='critic', objective='gan')]


def old_vdot_step_plan(k, gen_every, gan, dm):
    """The function as it was before plans became data (git a4147da, vdot_distiller.py), as
    (iteration, generator, critic)."""
    adversarial = gan and k % 2 == 1
    critic = 'gan' if adversarial else 'denoise'
    generator = None
    if k % gen_every == 0:
        generator = 'gan' if adversarial else ('dm' if dm else None)
    return k, generator, critic


def as_old(plan: StepPlan):
    """A plan as the old (iteration, generator, critic), checking it has at most one step per role
    and the generator's first."""
    roles = [s.role for s in plan.steps]
    assert roles in (['critic'], ['generator', 'critic']), roles
    return plan.iteration, plan.generator, plan.critic


def bound(schedule, gan=True, dm=True):
    available = {'generator': (('dm', ) if dm else ()) + (('gan', ) if gan else ()),
                 'critic': ('denoise', ) + (('gan', ) if gan else ())}
    schedule.bind(available)
    return schedule


@pytest.mark.parametrize('gen_every', [1, 2, 3, 5, 7])
@pytest.mark.parametrize('gan, dm', [(True, True), (False, True), (True, False)])
def test_algorithm1_trace_equals_the_old_function(gen_every, gan, dm):
    """Algorithm 1 + TTUR is unchanged: the function, the registered schedule built from a config dict,
    and the default schedule give the old plan for 1,000 iterations."""
    from_config = bound(build_schedule(dict(type='VDOTAlgorithm1', gen_every=gen_every)), gan, dm)
    default = bound(build_schedule(None, gen_every), gan, dm)
    for k in range(1000):
        expected = old_vdot_step_plan(k, gen_every, gan, dm)
        assert as_old(vdot_step_plan(k, gen_every, gan, dm)) == expected, k
        assert as_old(from_config.plan(k)) == expected, k
        assert as_old(default.plan(k)) == expected, k


def test_algorithm1_as_a_cyclic_list():
    """Algorithm 1 with TTUR 5 is the cycle of period lcm(2, 5) = 10 written out as data."""
    cycle = []
    for k in range(10):
        cycle.append([dict(role=s.role, objective=s.objective) for s in vdot_step_plan(k, 5, True, True).steps])
    cyclic = bound(build_schedule(cycle))
    assert isinstance(cyclic, CyclicStepPlan) and cyclic.period == 10
    for k in range(200):
        assert cyclic.plan(k) == vdot_step_plan(k, 5, True, True), k


def test_cyclic_plan_expands_repeats_and_groups():
    plan = bound(CyclicStepPlan(MOGAN_ORDER))
    assert plan.period == 7
    trace = [plan.plan(k).steps for k in range(14)]
    one_cycle = [(Step('generator', 'dm'), )] + [(Step('critic', 'denoise'), )] * 4 + \
        [(Step('generator', 'gan'), ), (Step('critic', 'gan'), )]
    assert trace == one_cycle * 2
    # the same order inside one iteration (one batch): a group; repeat there means steps, not iterations
    grouped = bound(CyclicStepPlan([MOGAN_ORDER]))
    assert grouped.period == 1
    assert [s.objective for s in grouped.plan(3).steps] == ['dm'] + ['denoise'] * 4 + ['gan', 'gan']
    assert grouped.plan(3).generator == 'dm' and grouped.plan(3).critic == 'denoise'
    # a plan without a generator step says so (the EMA hook skips such iterations)
    assert plan.plan(1).generator is None and plan.plan(1).critic == 'denoise'


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.schedule: the generator has no objective 'gan'.*switched off"):
        bound(CyclicStepPlan(MOGAN_ORDER), gan=False)
    with pytest.raises(ValueError, match=r"unknown role 'disc'"):
        bound(CyclicStepPlan([dict(role='disc', objective='gan')]))
    with pytest.raises(ValueError, match=r'model\.schedule\[1\]: repeat must be an integer >= 1'):
        CyclicStepPlan([dict(role='critic', objective='denoise'), dict(role='critic', objective='gan', repeat=0)])
    with pytest.raises(ValueError, match=r"model\.schedule\[0\]\[1\].*unknown \['objetive'\]"):
        CyclicStepPlan([[dict(role='critic', objective='denoise'), dict(role='critic', objetive='gan')]])
    with pytest.raises(ValueError, match='non-empty list'):
        CyclicStepPlan([])
    with pytest.raises(ValueError, match=r"model\.schedule\[0\]: an entry is a step dict or a non-empty list"):
        CyclicStepPlan([[]])
    with pytest.raises(ValueError, match=r"VDOTAlgorithm1\(gan=True\) but the model has no 'gan'"):
        bound(VDOTAlgorithm1(gen_every=5, gan=True), gan=False)
    with pytest.raises(ValueError, match='gen_every'):
        build_schedule(dict(type='VDOTAlgorithm1', gen_every=0))
    with pytest.raises(ValueError, match='disagree'):
        build_schedule(dict(type='VDOTAlgorithm1', gen_every=3), gen_every=5)
    with pytest.raises(ValueError, match="needs a 'type'"):
        build_schedule(dict(gen_every=3))
    with pytest.raises(RuntimeError, match='bind'):
        VDOTAlgorithm1().plan(0)
    assert set(STEP_PLANS.module_dict) >= {'VDOTAlgorithm1', 'CyclicStepPlan'}


# ----------------------------------------------------------------------
# the mechanism in a real VDOTDistiller
# ----------------------------------------------------------------------
def build_distiller(**overrides):
    cfg = dict(
        type='VDOTDistiller',
        real_score=dict(type='WanVACEScore', preset='tiny'),
        discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3),
                           bottleneck_dim=24, num_heads=2, use_time_emb=True),
        otd_loss=None, dmd_loss=dict(type='DMDLoss'),
        gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
        # CFG makes the teacher differ from the fake score it initialises (else DMD's gradient is 0)
        use_vace_context=False, guidance_scale=3.0, uncond='zeros', seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def build_optim(model, accumulative_counts=1):
    role = dict(type='OptimWrapper', accumulative_counts=accumulative_counts,
                optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0))
    return RoleOptimWrapperConstructor({name: dict(role) for name in model.trainable_roles()})(model)


def batch():
    g = torch.Generator().manual_seed(1)
    return dict(context=torch.randn(B, L, 32, generator=g), latents=torch.randn(B, 16, F, H, W, generator=g))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, before):
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_mogan_order_runs_through_train_step():
    """MoGAN's order as config data runs through the same train_step and guarded steps: in each
    iteration exactly the modules of the planned role and objective change."""
    model = build_distiller(schedule=MOGAN_ORDER)
    optim = build_optim(model)
    data = batch()
    for k in range(7):
        before = {name: state(getattr(model, name)) for name in ('generator', 'fake_score', 'discriminator')}
        log = model.train_step(data, optim)
        (step, ) = model.schedule_trace[-1].steps
        expected = {'generator': {'generator'},
                    'critic': {'fake_score'} if step.objective == 'denoise' else {'fake_score', 'discriminator'}}
        got = {name for name, sd in before.items() if changed(getattr(model, name), sd)}
        assert got == expected[step.role], (k, step, got)
        key = {('generator', 'dm'): 'loss_gen_dmd', ('generator', 'gan'): 'loss_gen_gan',
               ('critic', 'denoise'): 'loss_critic_denoise', ('critic', 'gan'): 'loss_critic_gan'}
        assert key[(step.role, step.objective)] in log
    assert [p.steps[0] for p in model.schedule_trace] == [CyclicStepPlan(MOGAN_ORDER).plan(k).steps[0]
                                                         for k in range(7)]
    assert model.gen_every is None and int(model.iteration) == 7
    with pytest.raises(ValueError, match='gen_every is the TTUR ratio of VDOTAlgorithm1'):
        build_distiller(schedule=MOGAN_ORDER, gen_every=5)
    with pytest.raises(ValueError, match="the generator has no objective 'gan'"):
        build_distiller(schedule=MOGAN_ORDER, gan_loss=None, discriminator=None)


def test_algorithm1_written_as_a_list_trains_identically():
    """The default schedule and Algorithm 1 written as a cyclic list give bit-identical weights."""
    cycle = [[dict(role=s.role, objective=s.objective) for s in vdot_step_plan(k, 3, True, True).steps]
             for k in range(6)]
    results = []
    for schedule, gen_every in ((None, 3), (cycle, None)):
        model = build_distiller(schedule=schedule, gen_every=gen_every)
        optim = build_optim(model)
        torch.manual_seed(11)
        for _ in range(4):       # dm + denoise, critic gan, denoise, generator gan + critic gan
            model.train_step(batch(), optim)
        results.append(model)
    assert results[0].schedule_trace == results[1].schedule_trace
    for key, value in results[0].state_dict().items():
        assert torch.equal(value, results[1].state_dict()[key]), key


# ----------------------------------------------------------------------
# gradient accumulation: the public code's gradient_accumulation_steps
# ----------------------------------------------------------------------
def test_algorithm1_accumulate_spreads_each_step_over_its_batches():
    plain = bound(VDOTAlgorithm1(gen_every=5))
    accumulated = bound(VDOTAlgorithm1(gen_every=5, accumulate=3))
    for k in range(90):
        assert accumulated.plan(k).iteration == k
        assert accumulated.plan(k).steps == plain.plan(k // 3).steps
    with pytest.raises(ValueError, match=r'model\.schedule\.accumulate'):
        VDOTAlgorithm1(accumulate=0)


def test_accumulation_updates_each_role_once_per_step_over_its_batches():
    """Step s of Algorithm 1 runs on 3 batches; each role it names accumulates them and updates once, at the
    third; nothing changes on the first two. The EMA reads ``updated_roles``."""
    model = build_distiller(schedule=dict(type='VDOTAlgorithm1', gen_every=2, accumulate=3))
    optim = build_optim(model, accumulative_counts=3)
    for k in range(12):
        before = {name: state(getattr(model, name)) for name in ('generator', 'fake_score')}
        model.train_step(batch(), optim)
        s, window_end = k // 3, k % 3 == 2
        expected = (('generator', ) if s % 2 == 0 else ()) + ('critic', ) if window_end else ()
        assert model.updated_roles == expected, (k, model.updated_roles)
        got = {name for name, sd in before.items() if changed(getattr(model, name), sd)}
        assert got == {dict(generator='generator', critic='fake_score')[r] for r in expected}, (k, got)
    # a schedule and wrappers that disagree are refused before anything trains
    model = build_distiller(schedule=dict(type='VDOTAlgorithm1', gen_every=2, accumulate=3))
    before = state(model.fake_score)
    with pytest.raises(ValueError, match=r'optim_wrapper\.generator\.accumulative_counts is 1 but '
                                         r'model\.schedule\.accumulate is 3'):
        model.train_step(batch(), build_optim(model))
    assert not changed(model.fake_score, before)



def test_ema_follows_the_generator_updates_only():
    """The EMA averages after each generator update: not on TTUR iterations, not inside an accumulation
    window, not when a non-finite step was skipped (docs/DESIGN.md §7)."""
    from types import SimpleNamespace

    from vdot_ext.engine.ema import GeneratorEMAHook
    model = build_distiller(schedule=dict(type='VDOTAlgorithm1', gen_every=2, accumulate=3))
    optim = build_optim(model, accumulative_counts=3)
    hook = GeneratorEMAHook(momentum=0.5)
    runner = SimpleNamespace(model=model, iter=0)
    hook.before_train(runner)
    updates = 0
    for k in range(12):
        data = batch()
        if k == 8:    # the last batch of the second generator window: a NaN skips (discards) that window
            data['context'][0, 0, 0] = float('nan')
        model.train_step(data, optim)
        runner.iter = k
        hook.after_train_iter(runner, k)
        updates += 'generator' in model.updated_roles
    assert updates == 1 and hook.steps == 1          # generator windows end at 2 (updated) and 8 (skipped)
    assert model.nonfinite_guard.skips('generator') == 1
