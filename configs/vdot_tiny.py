# The tiny two-stage VDOT demo, end to end on CPU (2 cores, about 12 minutes):
#
#   codecs   train a tiny Wan VAE, build a tiny umT5 text encoder
#   teacher  pretrain a tiny VACE-Wan teacher by flow matching on synthetic videos
#   stage1   distil its Wan DiT (text-to-video) into a 4-step generator with DMD
#            (1500 steps, TTUR 5, as the paper's stage 1)
#   stage2   AccWanInit (VACE teacher + stage-1 Wan blocks), then OTD + DMD / GAN
#            (1200 steps, as the paper's stage 2)
#            on multi-task VCUs (T2V, R2V, grey-scale V2V, outpainting MV2V)
#   evaluate teacher (40 steps) vs student (4 steps) samples and metrics
#
#   mim train vdot_ext configs/vdot_tiny.py --work-dir work_dirs/vdot_tiny
#
# '{work_dir}' in a stage is replaced by the recipe's work dir.
_base_ = ['./_base_/default_runtime.py', './_base_/vdot_objectives.py']

# tiny models are bound by per-op overhead: one intra-op thread is as fast as
# two on an idle 2-core machine and far faster on a busy one
torch_num_threads = 1

num_frames, height, width = 17, 64, 64
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
    real_score=dict(type='WanVACEScore', preset='tiny-vace'),
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
        num_frames=num_frames, height=height, width=width, seed=0)),
    teacher=dict(runner=dict(
        model=dict(type='FlowMatchingPretrainer',
                   score=dict(type='WanVACEScore', preset='tiny-vace'),
                   timestep_shift=3.0, text_drop_prob=0.1, vace_drop_prob=0.3),
        train_dataloader=dataloader(train_videos, batch_size=8),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=6000),
        optim_wrapper=dict(
            constructor='RoleOptimWrapperConstructor',
            score=dict(type='OptimWrapper',
                       optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.0),
                       clip_grad=dict(max_norm=1.0))))),
    stage1=dict(runner=dict(
        model=dict(
            type='VDOTDistiller',
            # Wan T2V teacher = the VACE teacher's DiT
            real_score=dict(type='WanVACEScore', preset='tiny'),
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
        dataset=dict(train_videos, num_samples=8, seed=99),
        vae_checkpoint=codec_dir + '/tiny_wan_vae.pth',
        samples_per_task=2, teacher_steps=40)),
)
