"""MoGAN as a recipe of the distiller (docs/DESIGN.md §13): its order runs as a step plan through the guarded
steps, each step changes only its role, the flow loss reaches the generator (exactly the chain rule), the
warm-up gate, the video-space and relativistic variants, the configs (paper values, per-role accumulation,
checks, reuse of the demo's stages) and a short run of the tiny recipe through the stage driver."""
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch.utils.data import Dataset

import vdot_ext.engine.evaluate_motion as evaluate_motion  # noqa: F401  (registers the call stages)
import vdot_ext.models.mogan_distiller  # noqa: F401  (registers MoGANDistiller, CheckpointInit, ...)
from vdot_ext.engine.config_checks import check_build_specs, check_required_fields
from vdot_ext.engine.optim import RoleOptimWrapperConstructor
from vdot_ext.engine.stages import _common, _Stage, check_stages, config_diff, run_stages
from vdot_ext.models.mogan_distiller import CheckpointInit, LatentVideoDiscriminator
from vdot_ext.models.mogan_schedules import MOGAN_ORDER, WarmupGatedPlan, accumulated_order
from vdot_ext.models.step_plans import CyclicStepPlan, Step
from vdot_ext.models.tiny_codecs import TinyWanVAE
from vdot_ext.models.wan_vace_score import WanVACEScore
from vdot_ext.registry import DATASETS, MODELS
from vdot_ext.utils import save_safetensors

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MOGAN_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'mogan', '**', '*.py'), recursive=True))
REAL = osp.join(ROOT, 'configs', 'mogan', 'mogan_wan1.3b.py')
REAL_OTD = osp.join(ROOT, 'configs', 'mogan', 'mogan_otd_wan1.3b.py')
TINY = osp.join(ROOT, 'configs', 'mogan', 'mogan_tiny.py')
B, K, h, w = 2, 3, 4, 4          # 2 clips of 3 latent chunks (9 frames of 32 × 32)
D_SMALL = dict(num_blocks=2, taps=(0, 1), head_attn_dim=24, head_attn_heads=2)
ORDER = [Step('generator', 'dm')] + [Step('critic', 'denoise')] * 4 + \
    [Step('generator', 'motion_gan'), Step('motion_discriminator', 'motion_gan')]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('mogan')
    vae = TinyWanVAE(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1, seed=0)
    vae_path = vae.save(str(root / 'tiny_wan_vae.pth'))
    prompt_path = str(root / 'prompt.safetensors')
    save_safetensors({'prompt_embedding': torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))},
                     prompt_path)
    return dict(root=root, vae=vae_path, prompt=prompt_path)


def build(files, **overrides):
    cfg = dict(
        type='MoGANDistiller',
        real_score=dict(type='WanVACEScore', preset='tiny'),
        motion_discriminator=dict(type='MotionDiscriminator', prompt_embedding=files['prompt'], **D_SMALL),
        vae_checkpoint=files['vae'],
        decoding=dict(type='WindowedVAEDecoding', window_chunks=2, gradient_checkpointing=False),
        # CFG makes the teacher differ from the fake score it initialises (else DMD's gradient is 0)
        use_vace_context=False, guidance_scale=3.0, uncond='zeros', seed=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def build_optim(model, lr=1e-3):
    role = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=lr, betas=(0.0, 0.999), weight_decay=0.0))
    return RoleOptimWrapperConstructor({name: dict(role) for name in model.trainable_roles()})(model)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(context=torch.randn(B, 6, 32, generator=g), latents=torch.randn(B, 16, K, h, w, generator=g))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, before):
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------ the schedule
def test_mogan_order_runs_as_a_step_plan_and_each_step_changes_only_its_role(files):
    """MoGAN's Appendix-B order (generator DMD, fake score × 4, generator MoGAN, discriminator) runs through
    the distiller's train_step, one guarded step per iteration; each step changes exactly its role's modules
    (the discriminator step: only D), the frozen teacher, VAE and flow estimator never change, and no
    gradient is left behind in another role (it would leak into that role's next update)."""
    model = build(files)
    assert isinstance(model.schedule, WarmupGatedPlan) and model.gen_every is None
    optim = build_optim(model)
    data = batch()
    names = ('generator', 'fake_score', 'motion_discriminator', 'real_score', 'vae')
    owner = {'generator': {'generator'}, 'critic': {'fake_score'},
             'motion_discriminator': {'motion_discriminator'}}
    expected_loss = {('generator', 'dm'): 'loss_gen_dmd', ('critic', 'denoise'): 'loss_critic_denoise',
                     ('generator', 'motion_gan'): 'loss_gen_motion_gan',
                     ('motion_discriminator', 'motion_gan'): 'loss_motion_disc'}
    for k in range(7):
        before = {name: snapshot(getattr(model, name)) for name in names}
        log = model.train_step(data, optim)
        (step, ) = model.schedule_trace[-1].steps
        assert step == ORDER[k], (k, step)
        got = {name for name in names if changed(getattr(model, name), before[name])}
        assert got == owner[step.role], (k, step, got)
        leftover = [n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum())]
        assert not leftover, (k, step, leftover[:3])
        assert expected_loss[(step.role, step.objective)] in log
        if step.role == 'motion_discriminator':
            # MoGAN eqs. 6-7: the R1/R2 terms are part of the discriminator step
            assert log['loss_motion_r1'] > 0 and log['loss_motion_r2'] > 0
            assert {'motion_d_real', 'motion_d_fake', 'motion_flow_real', 'motion_flow_fake'} <= set(log)
    assert int(model.iteration) == 7
    # the model's plan is the cyclic MoGAN order, repeated
    assert [model.plan(k).steps[0] for k in range(14)] == ORDER * 2
    assert CyclicStepPlan(MOGAN_ORDER).period == 7


def test_flow_loss_reaches_the_generator_as_the_exact_chain_rule(files):
    """x̂0 → decode (with gradients) → flow → D → λ1·g(−D): the surrogate step of the distiller gives the
    generator exactly the gradient of the loss back-propagated directly, it is finite and non-zero, and
    neither D nor the VAE receives gradient in the generator's step."""
    model = build(files, decoding=dict(type='WindowedVAEDecoding', window_chunks=None,
                                       gradient_checkpointing=True))
    model._set_trainable('generator', 'motion_gan')
    cond = model._conditions(model.data_preprocessor(batch(), True))
    cond['noise'] = torch.randn(B, 16, K, h, w, generator=torch.Generator().manual_seed(7))
    params = [p for p in model.generator.parameters() if p.requires_grad]

    losses, stats = model.motion_generator_losses(cond, exit_step=0)
    surrogate = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
    x0 = model.rollout(cond, 0, grad=True)
    flows = model.motion_features(x0, (0, K))
    assert flows.shape == (B, 4 * (K - 1), 2, 8 * h, 8 * w)
    direct_loss = model.motion_gan_loss(model.motion_discriminator(flows), None, 'generator')
    direct = torch.autograd.grad(direct_loss, params, allow_unused=True)
    total = 0.0
    for a, b in zip(surrogate, direct):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
            assert torch.isfinite(a).all()
            total += float(a.abs().sum())
    assert total > 0 and stats['gen_x_grad_norm_motion_gan'] > 0
    torch.testing.assert_close(losses['loss_gen_motion_gan'], direct_loss.detach())
    assert all(p.grad is None for p in model.motion_discriminator.parameters())
    assert all(p.grad is None for p in model.vae.parameters())


# ------------------------------------------------------------------------------------------- warm-up gate
def test_warmup_gate_plans():
    gate = WarmupGatedPlan(MOGAN_ORDER, start_iter=12)
    gate.bind({'generator': ('dm', 'motion_gan'), 'critic': ('denoise', ),
               'motion_discriminator': ('motion_gan', )})
    warm = [gate.plan(k).steps[0] for k in range(12)]
    # before the gate: the order without its motion steps (DMD + fake score), cycle of 5
    assert warm == ([Step('generator', 'dm')] + [Step('critic', 'denoise')] * 4) * 2 + \
        [Step('generator', 'dm'), Step('critic', 'denoise')]
    assert all(s.objective != 'motion_gan' for s in warm)
    # from the gate on: the full order from its start, with the model's iteration numbers
    assert [gate.plan(k).steps[0] for k in range(12, 26)] == ORDER * 2
    assert gate.plan(17).iteration == 17 and gate.plan(17).generator == 'motion_gan'
    assert WarmupGatedPlan(MOGAN_ORDER, start_iter=0).plan(5).steps == (Step('generator', 'motion_gan'), )
    with pytest.raises(ValueError, match='every step of the plan is gated'):
        WarmupGatedPlan([dict(role='generator', objective='motion_gan')], start_iter=3)
    with pytest.raises(ValueError, match=r'integer >= 0'):
        WarmupGatedPlan(MOGAN_ORDER, start_iter=-1)
    with pytest.raises(ValueError, match="'motion_gan' is gated"):
        WarmupGatedPlan(MOGAN_ORDER, start_iter=7, warmup=MOGAN_ORDER).bind(
            {'generator': ('dm', 'motion_gan'), 'critic': ('denoise', ), 'motion_discriminator': ('motion_gan', )})
    with pytest.raises(ValueError, match='derived from a cyclic plan'):
        WarmupGatedPlan(dict(type='VDOTAlgorithm1', gen_every=5), start_iter=3)
    # per-role accumulation: each step over as many batches as its role accumulates
    assert [e['repeat'] for e in accumulated_order(generator=2, critic=2, discriminator=8)] == [2, 8, 2, 8]


def test_warmup_gate_in_the_model(files):
    """motion_gan_start_iter: before it the motion GAN never steps (D unchanged, no motion losses); the plan
    is a function of k only, so a freshly built model (a resumed run) continues it exactly."""
    model = build(files, motion_gan_start_iter=5)
    optim = build_optim(model)
    d_before = snapshot(model.motion_discriminator)
    for _ in range(5):
        log = model.train_step(batch(), optim)
        assert not any('motion' in key and key.startswith('loss') for key in log)
    assert [p.steps[0] for p in model.schedule_trace] == ORDER[:5]
    assert not changed(model.motion_discriminator, d_before)
    assert [model.plan(k).steps[0] for k in range(5, 12)] == ORDER
    fresh = build(files, motion_gan_start_iter=5)
    assert [fresh.plan(k) for k in range(40)] == [model.plan(k) for k in range(40)]
    with pytest.raises(ValueError, match='already a WarmupGatedPlan'):
        build(files, schedule=WarmupGatedPlan(MOGAN_ORDER, 3), motion_gan_start_iter=2)
    with pytest.raises(ValueError, match='gen_every'):
        build(files, gen_every=5)


# ---------------------------------------------------------------------------------------------- variants
def test_video_space_gan_and_relativistic_loss_variants(files):
    """Table 2's video-space GAN (D on the window's latents, teacher patch embedding, no VAE) and the
    relativistic loss in place of the logistic one: both train their roles through the same steps."""
    model = build(files, motion_input='latents', vae_checkpoint=None, flow_estimator=None,
                  motion_discriminator=dict(type='LatentVideoDiscriminator', prompt_embedding=files['prompt'],
                                            **D_SMALL))
    disc = model.motion_discriminator
    assert isinstance(disc, LatentVideoDiscriminator) and model.vae is None
    torch.testing.assert_close(disc.patch_embedding.weight, model.real_score.dit.patch_embedding.weight)
    optim = build_optim(model)
    for _ in range(7):
        model.train_step(batch(), optim)
    assert model.schedule_trace[-1].steps[0].role == 'motion_discriminator'
    with pytest.raises(TypeError, match='must build a MotionDiscriminator'):
        build(files, motion_discriminator=dict(type='LatentVideoDiscriminator', prompt_embedding=files['prompt'],
                                               **D_SMALL))
    with pytest.raises(ValueError, match='vae_checkpoint is required'):
        build(files, vae_checkpoint=None)

    model = build(files, motion_gan_loss=dict(type='RelativisticGANLoss', loss_weight=1.0), schedule=[
        dict(role='generator', objective='motion_gan'), dict(role='motion_discriminator', objective='motion_gan')])
    optim = build_optim(model)
    before = snapshot(model.generator)
    log = model.train_step(batch(), optim)
    assert changed(model.generator, before) and 'loss_gen_motion_gan' in log
    log = model.train_step(batch(), optim)
    assert 'loss_motion_disc' in log and 'loss_motion_r1' not in log   # no regularizer() on that loss


def test_checkpoint_init(tmp_path):
    score = WanVACEScore('tiny')
    path = str(tmp_path / 'final_model.pth')
    torch.save({'state_dict': {f'generator.{k}': v for k, v in score.state_dict().items()}}, path)
    target = WanVACEScore('tiny')
    report = CheckpointInit(path, prefix='generator.')(target)
    assert report['tensors'] == len(score.state_dict())
    for key, value in score.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    with pytest.raises(ValueError, match="no keys with prefix 'fake_score.'"):
        CheckpointInit(path, prefix='fake_score.')(target)


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize('path', MOGAN_CONFIGS, ids=lambda p: osp.relpath(p, ROOT))
def test_mogan_configs_pass_the_config_checks(path):
    cfg = Config.fromfile(path)
    if 'stages' in cfg:
        check_stages(cfg)      # types, constructor keywords and '???' of every stage
    else:
        assert check_build_specs(cfg) == []


def test_config_checks_see_mogan_keywords():
    """MoGANDistiller forwards **kwargs to VDOTDistiller; its signature lists both, so a misspelled keyword
    is a config error before anything is built and an inherited one is accepted."""
    spec = dict(model=dict(type='MoGANDistiller', real_score=dict(type='WanVACEScore', preset='tiny'),
                           motion_discriminator=dict(type='LatentVideoDiscriminator', prompt_embedding='p',
                                                     in_channels=16, num_blocks=2, taps=(0, 1)),
                           guidance_scale=3.0, motion_gan_start_itr=5))
    problems = check_build_specs(spec)
    assert len(problems) == 1 and "no keyword 'motion_gan_start_itr'" in problems[0], problems
    assert 'motion_gan_start_iter' in problems[0]


def test_real_config_holds_the_paper_setting():
    cfg = Config.fromfile(REAL)
    m = cfg.model
    assert m.type == 'MoGANDistiller' and m.real_score.preset == 'wan2.1-t2v-1.3b'
    assert (m.motion_discriminator.num_blocks, tuple(m.motion_discriminator.taps)) == (16, (7, 13, 15))
    loss = m.motion_gan_loss
    assert (loss.type, loss.generator_weight, loss.discriminator_weight, loss.r1_weight, loss.r2_weight,
            loss.noise_sigma) == ('LogisticGANLoss', 0.5, 0.5, 0.3, 0.3, 0.01)
    assert m.flow_estimator.type == 'RAFTFlow' and m.flow_estimator.variant == 'large'
    assert m.decoding.window_chunks == 12 and m.decoding.gradient_checkpointing
    assert cfg.train_dataloader.dataset.num_frames == 81 and cfg.train_dataloader.batch_size == 1
    for role in ('generator', 'critic', 'motion_discriminator'):
        assert cfg.optim_wrapper[role].optimizer.type == 'AdamW' and cfg.optim_wrapper[role].optimizer.lr == 1e-5
    # batches: GPUs × clips per GPU × accumulation = 16 (generator, fake score) and 64 (discriminator)
    per_step = cfg.gpus * cfg.train_dataloader.batch_size
    assert per_step * cfg.optim_wrapper.generator.accumulative_counts == 16
    assert per_step * cfg.optim_wrapper.critic.accumulative_counts == 16
    assert per_step * cfg.optim_wrapper.motion_discriminator.accumulative_counts == 64
    # each step of the order spans as many batches as its role accumulates
    repeats = {(s.role, s.objective): s.repeat for s in m.schedule}
    acc = {role: cfg.optim_wrapper[role].accumulative_counts for role in cfg.optim_wrapper
           if role in ('generator', 'critic', 'motion_discriminator')}
    assert repeats == {('generator', 'dm'): acc['generator'], ('critic', 'denoise'): 4 * acc['critic'],
                       ('generator', 'motion_gan'): acc['generator'],
                       ('motion_discriminator', 'motion_gan'): acc['motion_discriminator']}
    assert cfg.train_cfg.max_iters == 800 * sum(repeats.values())     # 800 cycles of the order
    with pytest.raises(ValueError) as err:
        check_required_fields(cfg, 'configs/mogan/mogan_wan1.3b.py')
    for field in ('model.real_score.pretrained', 'model.generator_init.checkpoint', 'model.vae_checkpoint',
                  'model.motion_discriminator.prompt_embedding', 'model.flow_estimator.weights_path',
                  'train_dataloader.dataset.manifest'):
        assert field in str(err.value)
    # MoGAN + OTD is the same recipe with OTD in the regulariser: a config change only
    otd = Config.fromfile(REAL_OTD)
    diff = {path for path, _ in config_diff(json.loads(json.dumps(cfg.to_dict())),
                                            json.loads(json.dumps(otd.to_dict())))}
    assert diff == {'model.otd_loss', 'model.dm_weights'}, diff
    assert otd.model.otd_loss.type == 'OTDLoss' and otd.model.dm_weights == dict(otd=0.8, dmd=0.2)


def test_tiny_recipe_reuses_the_demo_stages_and_ablations_change_one_stage():
    demo, tiny = Config.fromfile(osp.join(ROOT, 'configs', 'vdot_tiny.py')), Config.fromfile(TINY)
    for name in ('codecs', 'teacher', 'stage1'):   # equal hashes: a demo work dir's stages are skipped
        hashes = {_Stage(name, cfg, _common(cfg), '/w').config_hash for cfg in (demo, tiny)}
        assert len(hashes) == 1, name
    stages = tiny.stages
    assert stages.mogan_otd.runner.model.otd_loss.type == 'OTDLoss'
    assert stages.dmd_only.runner.model.motion_gan_start_iter == stages.dmd_only.runner.train_cfg.max_iters
    base = Config.fromfile(osp.join(ROOT, 'configs', 'mogan', 'ablations', '_tiny_ablation.py')).to_dict()
    allowed = {'no_r1r2': {'motion_gan_loss.r1_weight', 'motion_gan_loss.r2_weight'},
               'video_gan': {'motion_input', 'vae_checkpoint', 'flow_estimator', 'motion_discriminator.type'},
               'no_dmd': {'dmd_loss', 'schedule'}}
    for row, keys in allowed.items():
        leaf = Config.fromfile(osp.join(ROOT, 'configs', 'mogan', 'ablations', f'{row}.py')).to_dict()
        diff = {p for p, _ in config_diff(json.loads(json.dumps(base)), json.loads(json.dumps(leaf)))}
        prefix = 'stages.mogan.runner.model.'
        model_diff = {p[len(prefix):] for p in diff if p.startswith(prefix)}
        assert {p.split('.')[0] for p in model_diff} == {k.split('.')[0] for k in keys}, (row, diff)
        others = {p for p in diff if not p.startswith(prefix)}
        assert others <= {'ablation_label', f'stages.motion_eval.call.models.{row}',
                          'stages.motion_eval.call.models.mogan', 'stages.mogan.runner.train_cfg.max_iters'}, others


@DATASETS.register_module(name='RandomT2VForMoGANTest', force=True)
class RandomT2VForMoGANTest(Dataset):

    def __init__(self, n=4):
        g = torch.Generator().manual_seed(0)
        self.items = [dict(context=torch.randn(6, 32, generator=g), negative_context=torch.randn(6, 32, generator=g),
                           latents=torch.randn(16, K, h, w, generator=g)) for _ in range(n)]

    def shape_key(self, index):
        return 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_real_config_runs_one_cycle_at_tiny_size_with_per_role_accumulation(files, tmp_path):
    """configs/mogan/mogan_wan1.3b.py at tiny size (LK flow instead of RAFT) through mmengine's Runner for one
    cycle of its order (8 GPUs' accumulation on one process): every role's optimizer steps exactly as often as
    its accumulation windows close (generator 2: DMD and motion; fake score 4; discriminator 1)."""
    cfg = Config.fromfile(REAL)
    tiny_arch = dict(dim=48, ffn_dim=96, num_heads=2, num_layers=4, text_dim=32, freq_dim=32)
    student = WanVACEScore('wan2.1-t2v-1.3b', **tiny_arch)
    source = str(tmp_path / 'dmd_student.pth')
    torch.save({'state_dict': {f'{role}.{k}': v for role in ('generator', 'fake_score')
                               for k, v in student.state_dict().items()}}, source)
    cfg.merge_from_dict({
        'model.real_score': dict(tiny_arch, pretrained=None, gradient_checkpointing=False),
        'model.generator_init.checkpoint': source, 'model.fake_score_init.checkpoint': source,
        'model.motion_discriminator': dict(prompt_embedding=files['prompt'], num_blocks=3, taps=(0, 1, 2),
                                           head_attn_dim=24, head_attn_heads=2, gradient_checkpointing=False),
        'model.vae_checkpoint': files['vae'],
        'model.flow_estimator': dict(_delete_=True, type='LucasKanadeFlow'),
        'train_dataloader': dict(num_workers=0, dataset=dict(_delete_=True, type='RandomT2VForMoGANTest')),
        'train_cfg.max_iters': cfg.cycle_iters,
        'env_cfg.dist_cfg.backend': 'gloo',
    })
    cfg.work_dir = str(tmp_path / 'work')
    cfg.launcher = 'none'
    runner = Runner.from_cfg(cfg)
    model = runner.model
    torch.testing.assert_close(model.generator.state_dict()['dit.head.head.weight'],
                               student.state_dict()['dit.head.head.weight'])
    runner.train()
    assert [p.steps[0] for p in model.schedule_trace] == [
        Step(s['role'], s['objective']) for s in cfg.model.schedule for _ in range(s['repeat'])]
    updates = {role: {int(st['step']) for st in wrapper.optimizer.state.values()}
               for role, wrapper in runner.optim_wrapper.items()}
    assert updates == {'generator': {2}, 'critic': {4}, 'motion_discriminator': {1}}, updates


# ------------------------------------------------------------------------------- the tiny recipe, shortened
SHORT_MOGAN = {
    'stages.mogan.runner.train_cfg.max_iters': 7, 'stages.mogan.runner.train_dataloader.dataset.num_samples': 4,
    'stages.mogan.runner.train_dataloader.batch_size': 2,
    'stages.motion_eval.call.dataset.num_samples': 2, 'stages.motion_eval.call.num_samples': 2,
    'stages.motion_eval.call.samples_to_write': 1, 'stages.motion_eval.call.teacher_steps': 0,
}
SHORT_SHARED = {
    'stages.codecs.call.vae_steps': 4, 'stages.codecs.call.num_train_videos': 2,
    'stages.teacher.runner.train_cfg.max_iters': 2, 'stages.teacher.runner.train_dataloader.dataset.num_samples': 4,
    'stages.teacher.runner.train_dataloader.batch_size': 2,
    'stages.stage1.runner.train_cfg.max_iters': 1, 'stages.stage1.runner.train_dataloader.dataset.num_samples': 4,
}


def _write_shared_stage_outputs(work):
    """What the demo's codecs, teacher and stage1 stages leave (untrained, tiny), so the MoGAN stages run
    alone."""
    import os

    from vdot_ext.data.synthetic_videos import caption_vocabulary
    from vdot_ext.models.tiny_codecs import TinyTextEncoder
    for name in ('codecs', 'teacher', 'stage1'):
        os.makedirs(osp.join(work, name), exist_ok=True)
    vae = TinyWanVAE(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1, seed=0)
    vae.save(osp.join(work, 'codecs', 'tiny_wan_vae.pth'))
    TinyTextEncoder(vocabulary=caption_vocabulary(), max_length=16, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                    num_layers=2, num_buckets=32, seed=0).save(osp.join(work, 'codecs', 'tiny_text_encoder.pth'))
    torch.manual_seed(0)
    arch = Config.fromfile(TINY).score_arch  # the recipe's score architecture (the demo's)
    teacher = WanVACEScore('tiny-vace', **arch).state_dict()
    torch.save({'state_dict': {f'score.{k}': v for k, v in teacher.items()}},
               osp.join(work, 'teacher', 'final_model.pth'))
    student = WanVACEScore('tiny', **arch).state_dict()
    torch.save({'state_dict': {f'{role}.{k}': v for role in ('generator', 'fake_score') for k, v in student.items()}},
               osp.join(work, 'stage1', 'final_model.pth'))


def _check_recipe_outputs(work, out, models):
    from vdot_ext.engine.checkpointing import resolve_resume_checkpoint
    from vdot_ext.engine.hooks import read_loss_curves
    from vdot_ext.models.motion_discriminator import MOTION_PROMPT
    from vdot_ext.models.tiny_codecs import TinyTextEncoder
    from vdot_ext.utils import load_tensor_file
    assert out['mogan']['iterations'] == 7
    curves = read_loss_curves(resolve_resume_checkpoint(osp.join(work, 'mogan')))
    assert {'loss_gen_dmd', 'loss_critic_denoise', 'loss_gen_motion_gan', 'loss_motion_disc', 'loss_motion_r1',
            'loss_motion_r2'} <= set(curves)
    prompt = load_tensor_file(out['motion_prompt']['prompt_embedding'])['prompt_embedding']
    encoder = TinyTextEncoder.load(osp.join(work, 'codecs', 'tiny_text_encoder.pth'))
    torch.testing.assert_close(prompt, encoder.encode([MOTION_PROMPT]))
    with open(out['motion_eval']['metrics_json']) as handle:
        metrics = json.load(handle)
    assert set(metrics['models']) == set(models) and metrics['num_samples'] == 2
    for values in list(metrics['models'].values()) + [metrics['real']]:
        assert {'dynamic_degree', 'motion_magnitude', 'warping_error', 'valid_fraction'} <= set(values)
        assert all(v == v for v in values.values() if isinstance(v, float))       # no NaN
    assert metrics['estimator'].startswith('LucasKanadeFlow')
    assert osp.isfile(osp.join(work, 'motion_eval', 'samples', '0000.mp4'))
    # the evaluated model is the one the stage trained (its marker's config, its final weights)
    resolved = evaluate_motion.resolve_model_entry('mogan', osp.join(work, 'mogan'))
    assert resolved['model']['type'] == 'MoGANDistiller' and '{work_dir}' not in json.dumps(resolved['model'])
    return metrics


def test_tiny_recipe_mogan_stage_through_the_stage_driver(tmp_path):
    """The tiny recipe's MoGAN stages (prompt, one cycle of MoGAN's order, motion evaluation) through the stage
    driver, on the outputs the demo's shared stages leave: final weights, motion losses in the loss curves, the
    prompt file, metrics of the model and of the real clips, samples; then the mean ± std table of runs."""
    cfg = Config.fromfile(TINY)
    cfg.merge_from_dict(dict(SHORT_MOGAN, stage_order=['motion_prompt', 'mogan', 'motion_eval'],
                             **{'stages.motion_eval.call.models': dict(_delete_=True, mogan='{work_dir}/mogan',
                                                                       again='{work_dir}/mogan')}))
    work = str(tmp_path / 'mogan_tiny')
    _write_shared_stage_outputs(work)
    out = run_stages(cfg, work)
    metrics = _check_recipe_outputs(work, out, {'mogan', 'again'})
    # the same model sampled twice gives the same videos: the sampler's re-noising is seeded per sample, not
    # left to the global RNG (which the first model's sampling advanced)
    assert {k: v for k, v in metrics['models']['again'].items() if k != 'seconds_per_sample'} == \
        {k: v for k, v in metrics['models']['mogan'].items() if k != 'seconds_per_sample'}

    # mean ± std over runs (here the run and a perturbed copy)
    other = tmp_path / 'other.json'
    perturbed = json.loads(json.dumps(metrics))
    perturbed['models']['mogan']['warping_error'] += 0.2
    other.write_text(json.dumps(perturbed))
    summary = evaluate_motion.summarize_motion_runs([osp.join(work, 'motion_eval'), str(other)])
    we = summary['mogan']['warping_error']
    assert we['n'] == 2 and abs(we['mean'] - (metrics['models']['mogan']['warping_error'] + 0.1)) < 1e-9
    assert abs(we['std'] - 0.2 / 2 ** 0.5) < 1e-9
    assert '| mogan | 2 |' in evaluate_motion.format_table(summary)
    perturbed['estimator'] = 'RAFTFlow(raft_large, x.pth)'
    other.write_text(json.dumps(perturbed))
    with pytest.raises(ValueError, match='different flow estimators'):
        evaluate_motion.summarize_motion_runs([work, str(other)])


@pytest.mark.slow
def test_tiny_recipe_short_run_with_the_shared_stages(tmp_path):
    """The same with the demo's stages run (very short) by the driver first: the MoGAN stages consume the
    codecs, the teacher and the stage-1 student they write."""
    cfg = Config.fromfile(TINY)
    cfg.merge_from_dict(dict(SHORT_MOGAN, **SHORT_SHARED, stage_order=[
        'codecs', 'teacher', 'stage1', 'motion_prompt', 'mogan', 'motion_eval'], **{
        'stages.motion_eval.call.models': dict(_delete_=True, stage1='{work_dir}/stage1', mogan='{work_dir}/mogan')}))
    work = str(tmp_path / 'mogan_tiny')
    out = run_stages(cfg, work)
    _check_recipe_outputs(work, out, {'stage1', 'mogan'})


# ------------------------------------------------------------------------------- several training seeds
SHORT_SEEDS = dict(SHORT_MOGAN, **{
    'stage_order': ['motion_prompt', 'mogan', 'motion_eval'],
    'stages.motion_eval.call.models': dict(_delete_=True, mogan='{work_dir}/mogan')})


@pytest.mark.slow
def test_seeds_tool_seeds_the_post_training_shares_the_rest_and_tabulates(tmp_path):
    """``vdot_ext.tools.mogan_seeds``: seed k reaches the runner and the model of every MoGANDistiller stage (and
    only those), the unseeded prompt stage runs once and is linked into the other seed, the seeds' weights
    differ (D's random init, noise, data order), a rerun runs nothing, and the table has mean ± std of n=2."""
    from mmengine.logging import MMLogger

    from vdot_ext.tools import mogan_seeds
    from vdot_ext.tools.ablate import run_dirs
    assert mogan_seeds.seeded_stages(Config.fromfile(TINY)) == [
        'dmd_only', 'mogan', 'mogan_otd', 'mogan_no_r1r2', 'mogan_video_gan', 'mogan_no_dmd']
    root = tmp_path / 'root'
    runs = [str(root / 'mogan_tiny' / f'seed{k}') for k in (0, 1)]
    logger = MMLogger.get_instance('test_mogan_seeds')
    seeded = ['mogan']
    for seed, run in zip((0, 1), runs):
        _write_shared_stage_outputs(run)
        cfg = mogan_seeds.load_seed_config(TINY, seed, seeded, SHORT_SEEDS)
        assert cfg.stages.mogan.runner.randomness.seed == seed and cfg.stages.mogan.runner.model.seed == seed
        mogan_seeds.run_seed(cfg, run, run_dirs(str(root)), 'symlink', logger)
    assert osp.islink(osp.join(runs[1], 'motion_prompt')) and not osp.islink(osp.join(runs[1], 'mogan'))
    for seed, run in zip((0, 1), runs):        # the seed is in the trained stage's resolved config
        with open(osp.join(run, 'mogan', 'stage_done.json')) as handle:
            trained = json.load(handle)['config']
        assert trained['randomness']['seed'] == seed and trained['model']['seed'] == seed
    weights = [torch.load(osp.join(run, 'mogan', 'final_model.pth'), weights_only=True)['state_dict'] for run in runs]
    key = next(k for k in weights[0] if k.startswith('motion_discriminator.patch_embedding'))
    assert not torch.equal(weights[0][key], weights[1][key])
    with open(osp.join(runs[0], mogan_seeds.TIMINGS_FILE)) as handle:
        timings = json.load(handle)
    assert timings['mogan']['wall_s'] > 0 and timings['mogan']['cpu_s'] > 0
    markers = {run: osp.getmtime(osp.join(run, 'mogan', 'stage_done.json')) for run in runs}
    cfg = mogan_seeds.load_seed_config(TINY, 0, seeded, SHORT_SEEDS)
    mogan_seeds.run_seed(cfg, runs[0], run_dirs(str(root)), 'symlink', logger)      # a rerun: nothing runs
    assert osp.getmtime(osp.join(runs[0], 'mogan', 'stage_done.json')) == markers[runs[0]]
    # --force-rerun: seed 1's evaluation is set aside (replaced/) and recomputed; its training is kept
    cfg = mogan_seeds.load_seed_config(TINY, 1, seeded, SHORT_SEEDS)
    evaluated = osp.getmtime(osp.join(runs[1], 'motion_eval', 'stage_done.json'))
    mogan_seeds.run_seed(cfg, runs[1], run_dirs(str(root)), 'symlink', logger, force_rerun=['motion_eval'])
    assert osp.getmtime(osp.join(runs[1], 'mogan', 'stage_done.json')) == markers[runs[1]]
    assert osp.getmtime(osp.join(runs[1], 'motion_eval', 'stage_done.json')) > evaluated
    assert glob.glob(osp.join(runs[1], 'replaced', '*', 'motion_eval', 'stage_done.json'))

    result = mogan_seeds.report(str(root), runs, [0, 1], 'cmd', seeded)
    per_seed = [result['per_seed'][f'seed{k}']['models']['mogan']['motion_magnitude'] for k in (0, 1)]
    cell = result['summary']['mogan']['motion_magnitude']
    assert cell['n'] == 2 and abs(cell['mean'] - sum(per_seed) / 2) < 1e-9
    assert abs(cell['std'] - abs(per_seed[0] - per_seed[1]) / 2 ** 0.5) < 1e-9
    assert '| mogan | 2 |' in result['table'] and '| real clips | 2 |' in result['table']
    assert osp.isfile(osp.join(str(root), mogan_seeds.TABLE_FILE))
