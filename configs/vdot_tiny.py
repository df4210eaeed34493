# The tiny two-stage VDOT demo, end to end on CPU (10 min 11 s on 2 idle cores,
# benchmarks/RESULTS.md):
#
#   codecs   the tiny Wan VAE and umT5 text encoder: the shipped pretrained ones (default)
#            or trained here (from scratch, below)
#   teacher  the tiny VACE-Wan teacher: the shipped pretrained one, written as the stage's
#            final_model.pth after 0 training iterations (default), or pretrained here by
#            flow matching on synthetic videos (from scratch)
#   stage1   distil its Wan DiT (text-to-video) into a 4-step generator with DMD
#            (1500 steps, TTUR 5, as the paper's stage 1)
#   stage2   AccWanInit (VACE teacher + stage-1 Wan blocks), then OTD + DMD / GAN
#            (1200 steps, as the paper's stage 2)
#            on multi-task VCUs (T2V, R2V, grey-scale V2V, outpainting MV2V)
#   evaluate held-out samples (24 per task, seeded noise per sample): real video, codec
#            reconstruction, teacher at 40 and at 4 steps, student at 4 steps; mean ± SE
#
#   mim train vdot_ext configs/vdot_tiny.py --work-dir work_dirs/vdot_tiny
#
# Demo assets. A CPU demo cannot train a codec and a teacher good enough to show
# distillation, so by default the codecs and teacher stages install the small pretrained
# assets shipped in vdot_ext/demo_assets (safetensors, made by
# `python -m vdot_ext.tools.make_demo_assets --out vdot_ext/demo_assets`, which runs this
# config's codecs and teacher stages from scratch with the longer settings it records in
# vdot_ext/demo_assets/manifest.json; the shipped ones were made on a GPU with --device
# cuda). Each file is checked against its SHA-256 pinned below (demo_asset_sha256) and
# loaded by the real loaders (TinyWanVAE / TinyTextEncoder, and load_weights into
# WanVACEScore). The environment variable VDOT_DEMO_ASSETS chooses:
#   unset or 'shipped'   the package's vdot_ext/demo_assets
#   a folder             assets made by make_demo_assets --out <folder> (checked against
#                        <folder>/manifest.json)
#   'none'               from scratch: train the codecs and the teacher here with the short
#                        settings below (the codec and teacher are then much weaker)
#   VDOT_DEMO_ASSETS=none mim train vdot_ext configs/vdot_tiny.py --work-dir work_dirs/vdot_tiny_scratch
#
# '{work_dir}' in a stage is replaced by the recipe's work dir.
_base_ = ['./_base_/default_runtime.py', './_base_/vdot_objectives.py']

# tiny models are bound by per-op overhead: one intra-op thread is as fast as
# two on an idle 2-core machine and far faster on a busy one
torch_num_threads = 1

demo_assets = '{{$VDOT_DEMO_ASSETS:shipped}}'
from_scratch = demo_assets.lower() == 'none'
# SHA-256 of the shipped files, as make_demo_assets prints them; another folder is checked
# against its own manifest.json (None)
demo_asset_sha256 = dict(
    vae='a682ab6a1bb427de49ef3372f1e1491cdb635fb22d2eb0d25e183f19180cade3',
    text_encoder='1d19ac565752d1d9902f0e6d7386bca71fef45bf2c8aa1a8bc157c38eb647c21',
    teacher='da6ebe1bfd794c5f60edc04ed41483c7175688c3461c1c176b72d28b3a409b9e',
) if demo_assets == 'shipped' else dict(vae=None, text_encoder=None, teacher=None)

num_frames, height, width = 17, 64, 64
# the score networks (teacher, fake score, student) are the tiny Wan/VACE presets widened: a
# token carries a 2×2 patch of 16 latent channels, 64 numbers, which the presets' 48 channels
# cannot hold, so a 48-channel teacher cannot even copy its kept pixels (docs/DESIGN.md §8)
score_arch = dict(dim=96, ffn_dim=192)
tasks = ('t2v', 'r2v', 'v2v_gray', 'mv2v_outpaint')
codec_dir = '{work_dir}/codecs'

train_videos = dict(
    type='SyntheticVideoDataset',
    num_samples=256,
    tasks=tasks,
    num_frames=num_frames, height=height, width=width,
    seed=0,
    data_root='{work_dir}/data',
    vae_checkpoint=codec_dir + '/tiny_wan_vae.pth',
    text_encoder_checkpoint=codec_dir + '/tiny_text_encoder.pth')


def dataloader(dataset, batch_size):  # noqa: E302
    return dict(
        batch_size=batch_size,
        num_workers=0,
        sampler=dict(type='InfiniteSampler', shuffle=True),
        batch_sampler=dict(type='ShapeGroupedBatchSampler'),
        collate_fn=dict(type='default_collate'),
        dataset=dataset)


def role_optimizers(lr_generator, lr_critic):  # noqa: E302
    return dict(
        constructor='RoleOptimWrapperConstructor',
        generator=dict(type='OptimWrapper',
                       optimizer=dict(type='AdamW', lr=lr_generator,
                                      betas=(0.0, 0.999), weight_decay=0.0),
                       clip_grad=dict(max_norm=1.0)),
        critic=dict(type='OptimWrapper',
                    optimizer=dict(type='AdamW', lr=lr_critic,
                                   betas=(0.0, 0.999), weight_decay=0.0),
                    clip_grad=dict(max_norm=1.0)))


teacher_weights = '{work_dir}/teacher/final_model.pth'
teacher_guidance = 3.0

# stage 2 (also used by the evaluation)
stage2_model = dict(
    type='VDOTDistiller',
    real_score=dict(type='WanVACEScore', preset='tiny-vace', **score_arch),
    real_score_weights=dict(checkpoint=teacher_weights, prefix='score.'),
    # AccWanInit: the VACE teacher with its Wan blocks from the stage-1 student
    generator_init=dict(type='VACEAccWanInit',
                        source='{work_dir}/stage1/final_model.pth',
                        source_prefix='generator.'),
    # 4-layer fake score: taps after blocks 1, 2, 3 (14B: 23, 31, 39)
    discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 2, 3),
                       bottleneck_dim=24, num_heads=2, use_time_emb=True),
    otd_loss={{_base_.otd_loss}},
    dmd_loss={{_base_.dmd_loss}},
    denoising_loss={{_base_.denoising_loss}},
    gan_loss={{_base_.gan_loss}},
    dm_weights={{_base_.dm_weights}},
    gen_every={{_base_.gen_every}},
    guidance_scale=teacher_guidance,
    # the tiny teacher learns a zero-text null context (no Wan negative prompt)
    uncond='zeros',
    use_vace_context=True)

stage_order = ['codecs', 'teacher', 'stage1', 'stage2', 'evaluate']
stages = dict(
    codecs=dict(call=dict(
        type='prepare_tiny_codecs', work_dir='{work_dir}',
        num_frames=num_frames, height=height, width=width, seed=0,
        pretrained=None if from_scratch else demo_assets,
        pretrained_sha256=None if from_scratch else demo_asset_sha256)),
    teacher=dict(runner=dict(
        model=dict(type='FlowMatchingPretrainer',
                   score=dict(type='WanVACEScore', preset='tiny-vace', **score_arch),
                   timestep_shift=3.0, text_drop_prob=0.1, vace_drop_prob=0.3,
                   pretrained=None if from_scratch else dict(
                       assets=demo_assets, sha256=demo_asset_sha256['teacher'])),
        train_dataloader=dataloader(train_videos, batch_size=8),
        # shipped teacher: 0 iterations (its weights become final_model.pth)
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=6000 if from_scratch else 0),
        optim_wrapper=dict(
            constructor='RoleOptimWrapperConstructor',
            score=dict(type='OptimWrapper',
                       optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.0),
                       clip_grad=dict(max_norm=1.0))))),
    stage1=dict(runner=dict(
        model=dict(
            type='VDOTDistiller',
            # Wan T2V teacher = the VACE teacher's DiT
            real_score=dict(type='WanVACEScore', preset='tiny', **score_arch),
            real_score_weights=dict(checkpoint=teacher_weights, prefix='score.',
                                    ignore=['vace.']),
            dmd_loss={{_base_.dmd_loss}},
            otd_loss=None, gan_loss=None, discriminator=None,
            denoising_loss={{_base_.denoising_loss}},
            gen_every={{_base_.gen_every}},
            guidance_scale=teacher_guidance,
            uncond='zeros',
            use_vace_context=False),
        train_dataloader=dataloader(
            dict(train_videos, tasks=('t2v', ), with_vace_context=False), batch_size=4),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=1500),
        optim_wrapper=role_optimizers(lr_generator=1e-4, lr_critic=2e-4))),
    stage2=dict(runner=dict(
        model=stage2_model,
        train_dataloader=dataloader(train_videos, batch_size=4),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=1200),
        optim_wrapper=role_optimizers(lr_generator=5e-5, lr_critic=2e-4))),
    evaluate=dict(call=dict(
        type='evaluate_vdot',
        model=stage2_model,
        checkpoint='{work_dir}/stage2/final_model.pth',
        # held-out samples: another seed
        dataset=dict(train_videos, num_samples=24 * len(tasks), seed=99),
        vae_checkpoint=codec_dir + '/tiny_wan_vae.pth',
        samples_per_task=24, teacher_steps=40, videos_per_task=2)),
)
