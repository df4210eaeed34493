"""benchmarks/toy: the exact mixture teacher, the mode metrics, seed batching and a short training run.

The toy benchmark trains with the project's DMDLoss / OTDLoss / DenoisingLoss and the distiller's weighting
function (vdot_ext.losses.dm_weighting); these tests check the parts that are the toy's own."""
import math
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'benchmarks', 'toy')
if TOY not in sys.path:
    sys.path.insert(0, TOY)

import mixtures  # noqa: E402
import run_benchmark  # noqa: E402
import toy_distill  # noqa: E402

from vdot_ext.losses import dm_weighting  # noqa: E402
from vdot_ext.models import vdot_distiller  # noqa: E402


def _small_mixture():
    means = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.3, -1.2]], dtype=torch.float64)
    return mixtures.Mixture('small', means, torch.tensor([0.2, 0.35, 0.1], dtype=torch.float64),
                            torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


@pytest.mark.parametrize('t', [300.0, 600.0, 900.0])
def test_teacher_x0_matches_monte_carlo_posterior_mean(t):
    """E[x0 | x_t] by self-normalised importance sampling: x0 ~ p, weights N(x_t; (1 − σ)x0, σ²I)."""
    mix = _small_mixture()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400_000, g).double()
    sigma = t / 1000.0
    x_t = torch.tensor([[0.3, 0.2], [-0.4, 0.5], [0.0, -0.8], [0.9, 0.1]], dtype=torch.float64)
    log_w = -((x_t[:, None, :] - (1 - sigma) * x0[None]).square().sum(-1)) / (2 * sigma ** 2)
    w = torch.softmax(log_w, dim=1)
    mc = w @ x0
    ess = 1.0 / w.square().sum(1)
    assert bool((ess > 2000).all()), ess                    # enough effective samples for the tolerance below
    exact = mix.teacher_x0(x_t, torch.full((4, ), t))
    torch.testing.assert_close(exact, mc, atol=0.02, rtol=0)


def test_teacher_x0_is_tweedie_and_limits():
    """E[x0|x_t] = (x_t + σ² ∇log p_t(x_t)) / (1 − σ), the score by autograd of the exact log density; at σ = 1
    the mixture mean; at σ → 0 the identity."""
    mix = _small_mixture()
    x_t = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for t in (100.0, 500.0, 950.0):
        sigma = t / 1000.0
        (score, ) = torch.autograd.grad(mix.log_prob_t(x_t, torch.tensor(t)).sum(), x_t)
        tweedie = (x_t.detach() + sigma ** 2 * score) / (1 - sigma)
        torch.testing.assert_close(mix.teacher_x0(x_t.detach(), torch.full((16, ), t)), tweedie)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    torch.testing.assert_close(mix.teacher_x0(x_t.detach(), torch.full((16, ), 1000.0)), mean.expand(16, 2))
    torch.testing.assert_close(mix.teacher_x0(x_t.detach(), torch.full((16, ), 1e-4)), x_t.detach(), atol=1e-6,
                               rtol=0)


def test_mode_metrics():
    mix = mixtures.make_mixture('unbalanced3')
    g = torch.Generator().manual_seed(0)
    exact = mixtures.mode_metrics(mix, mix.sample(4000, g))
    assert exact['coverage'] == 1.0 and exact['weight_l1'] < 0.05 and exact['off_mode'] < 0.01
    # every sample on the 0.2 mode: one mode of three covered, L1 = |1 − 0.2| + 0.7 + 0.1
    one = mix.means[1] + mix.stds[1] * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    m = mixtures.mode_metrics(mix, one.float())
    assert m['coverage'] == pytest.approx(1 / 3) and m['weight_l1'] == pytest.approx(1.6)
    # samples at the centre, between the modes: off mode
    assert mixtures.mode_metrics(mix, torch.zeros(100, 2))['off_mode'] == 1.0
    # W2 of a shifted copy of itself: the shift
    x = mix.sample(300, g)
    assert mixtures.w2_exact(x, x + torch.tensor([0.3, 0.4])) == pytest.approx(0.5, abs=1e-5)


def test_the_toy_uses_the_distillers_weighting_code():
    assert toy_distill.distribution_matching_gradients is dm_weighting.distribution_matching_gradients
    assert vdot_distiller.distribution_matching_gradients is dm_weighting.distribution_matching_gradients
    assert toy_distill.gradient_stats is vdot_distiller.gradient_stats


@pytest.mark.parametrize('variant', ['dmd', 'otd_parity', 'otd_balanced', 'otd_dmd_parity', 'otd_dmd_balanced'])
def test_seeds_side_by_side_get_the_gradient_of_a_run_of_their_own(variant):
    """The losses' loss_weight = S undoes the mean over S seeds: seed 1 of a 3-seed batch receives exactly the
    gradient a 1-seed run receives on the same samples."""
    mix = mixtures.make_mixture('ring8')
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 64, 2, generator=g)
    t = torch.tensor([300.0, 700.0, 500.0])
    x_t = (1 - t[:, None, None] / 1000) * x0 + t[:, None, None] / 1000 * torch.randn(3, 64, 2, generator=g)
    real = mix.teacher_x0(x_t, t[:, None]).float()
    fake = real + 0.3 * torch.randn(3, 64, 2, generator=g)
    common = dict(mixture='ring8', variant=variant, batch=64, hidden=16,
                  otd_overrides=dict(tol=None, num_iters=200))
    toy3 = toy_distill.ToyDistillation(toy_distill.ToyConfig(seeds=[0, 1, 2], **common), mix)
    toy1 = toy_distill.ToyDistillation(toy_distill.ToyConfig(seeds=[1], **common), mix)
    grads3, _ = toy3.dm_gradients(x0, fake, real, t)
    grads1, stats1 = toy1.dm_gradients(x0[1:2], fake[1:2], real[1:2], t[1:2])
    assert set(grads3) == set(grads1) and grads1
    for name in grads1:
        assert float(grads1[name].norm()) > 0
        torch.testing.assert_close(grads3[name][1:2], grads1[name], rtol=1e-4, atol=1e-9)
    if variant == 'otd_dmd_parity':
        # parity: the OT step is c·w per cloud (‖ĝ‖ = 1), whatever the samples
        assert stats1['gen_x_grad_norm_otd'] == pytest.approx(0.8 * 0.1, rel=1e-4)


def test_ensemble_members_are_independent():
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    net = toy_distill.EnsembleMLP(2, [3, 8, 2], gens)
    x = torch.randn(2, 5, 3)
    before = net(x)[1].clone()
    with torch.no_grad():
        net.weights[0][0].add_(1.0)
        net.biases[1][0].add_(1.0)
    after = net(x)
    torch.testing.assert_close(after[1], before)
    assert not torch.allclose(after[0], net(x)[1])
    zero = toy_distill.EnsembleMLP(2, [3, 8, 2], gens, zero_last=True)
    assert float(zero(x).detach().abs().max()) == 0.0


def test_fake_score_starts_as_the_teacher_and_rollout_convention():
    mix = mixtures.make_mixture('ring8')
    toy = toy_distill.ToyDistillation(toy_distill.ToyConfig(seeds=[0, 1], batch=32, hidden=16), mix)
    x_t = torch.randn(2, 32, 2)
    t = torch.tensor([200.0, 800.0])
    torch.testing.assert_close(toy.fake_x0(x_t, t), toy.teacher_x0(x_t, t), rtol=1e-5, atol=1e-5)
    # [1000, 750, 500, 250] through the shift 5 (docs/DESIGN.md §4)
    torch.testing.assert_close(toy.steps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), rtol=1e-5, atol=1e-3)


def test_short_training_run_and_table(tmp_path):
    """One seed, a few iterations, every variant: finite metrics, the TTUR step count, generator moved."""
    mix = mixtures.make_mixture('ring8')
    reference = mix.sample(64, torch.Generator().manual_seed(5))
    results = []
    for variant in toy_distill.VARIANTS:
        cfg = toy_distill.ToyConfig(mixture='ring8', variant=variant, seeds=[0], iterations=11, eval_every=10,
                                    batch=32, hidden=16, eval_samples=64, final_samples=64)
        result = toy_distill.run(cfg, mix, reference)
        assert [h['iteration'] for h in result['history']] == [0, 10, 11]
        assert result['history'][-1]['generator_steps'] == 3        # k = 0, 5, 10: Algorithm 1's TTUR
        final = result['final'][0]
        assert final['diverged'] == 0.0 and all(math.isfinite(final[k]) for k in run_benchmark.METRICS)
        assert result['history'][0]['seeds'][0]['w2'] != final['w2']   # the generator has moved
        assert ('otd' in result['losses']) == variant.startswith('otd')   # the loss settings are recorded
        assert result['losses'].get('otd', 'OTDLoss(').startswith('OTDLoss(')
        results.append(result)
    table = run_benchmark.render_table(results, {'ring8': {'64': 0.1}}, 64)
    assert table.count('\n| ring8 | 5 | 3 |') == len(toy_distill.VARIANTS)
    paired = run_benchmark.render_paired(results)
    assert paired.count('\n| ring8 |') == len(toy_distill.VARIANTS) - 1
    assert len(re.findall(r'\([01]/1 better\)', paired)) == 4 * (len(toy_distill.VARIANTS) - 1)
    run_benchmark.plot(results, str(tmp_path / 'plot.png'))
    assert (tmp_path / 'plot.png').stat().st_size > 0


def test_evaluating_does_not_change_training():
    """Evaluation re-noises from its own stream: the final metrics do not depend on how often one evaluates."""
    mix = mixtures.make_mixture('unbalanced3')
    reference = mix.sample(48, torch.Generator().manual_seed(5))
    finals = []
    for eval_every in (2, 100):
        cfg = toy_distill.ToyConfig(mixture='unbalanced3', variant='otd_dmd_balanced', seeds=[3], iterations=8,
                                    eval_every=eval_every, batch=32, hidden=16, eval_samples=48, final_samples=48)
        finals.append(toy_distill.run(cfg, mix, reference)['final'])
    assert finals[0] == finals[1]
