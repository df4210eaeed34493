# The tiny MoGAN recipe on CPU (docs/DESIGN.md §13): motion-GAN post-training of the tiny demo's
# stage-1 DMD student, with and without OTD in the DMD regulariser, against DMD alone, and MoGAN's
# Table-2 ablation rows.
#
#   codecs, teacher, stage1   the tiny VDOT demo's stages (../vdot_tiny.py), unchanged: a work dir
#                             where the demo ran already has them and skips them
#   motion_prompt             encode D's fixed prompt "a video with good motion" once
#   dmd_only                  the stage-1 student, post-trained with DMD alone (the gate never opens)
#   mogan                     the same + the optical-flow GAN (MoGAN's order, logistic loss + R1/R2)
#   mogan_otd                 the same with 0.8·OTD + 0.2·DMD as the regulariser (a config change)
#   mogan_no_r1r2, mogan_video_gan, mogan_no_dmd
#                             MoGAN Table 2, each a config change of `mogan`: without R1/R2, the GAN on
#                             latents instead of flow, without the DMD regulariser (./ablations/ runs
#                             one row alone)
#   motion_eval               samples (with their flow fields) and motion metrics of every student above,
#                             the 40-step teacher and the real clips
#
#   mim train vdot_ext configs/mogan/mogan_tiny.py --work-dir work_dirs/vdot_tiny    # after the demo
#   mim train vdot_ext configs/mogan/mogan_tiny.py --work-dir work_dirs/mogan_tiny   # from scratch
#   python -m vdot_ext.tools.mogan_seeds --seeds 0 1 2 --work-root work_dirs/mogan_seeds   # mean ± std table
#
# The post-training runs see the same number of DMD-regulariser and fake-score updates (post_cycles of
# MoGAN's order); the MoGAN runs add one generator and one discriminator motion update per cycle. The
# stage-1 student is the warm-up MoGAN §4.2 asks for, so the motion GAN starts at once
# (motion_gan_start_iter=0); dmd_only is the same model whose gate opens only after its last iteration.
# CPU budget (1 thread): a motion update costs ~1 s (decode + Lucas–Kanade flow + D, forward and
# backward), 6× a DMD cycle; post_cycles and the 2-chunk window keep these stages near 5 CPU minutes.
_base_ = ['../vdot_tiny.py']

# two intra-op threads: the motion updates decode videos through the VAE (convolutions), which use
# the second core; measured on 2 idle cores, the `mogan` stage takes 59 s instead of 81 s. The demo's
# stage 1 (tiny transformers, per-op bound) is slower at 2 (183 s against 157 s), so it keeps one
# (stages.stage1.torch_num_threads below; benchmarks/RESULTS.md)
torch_num_threads = 2

# the runtime's imports, plus MoGANDistiller, CheckpointInit, LatentVideoDiscriminator, WarmupGatedPlan
# and the recipe's call stages
custom_imports = dict(
    imports=_base_.custom_imports.imports + ['vdot_ext.models.mogan_distiller', 'vdot_ext.engine.evaluate_motion'],
    allow_failed_imports=False)

# cycles of MoGAN's order per post-training run: (1) generator DMD, (2) fake score x 4,
# (3) generator motion GAN, (4) motion discriminator
post_cycles = 32
vae_file = _base_.codec_dir + '/tiny_wan_vae.pth'
stage1_weights = '{work_dir}/stage1/final_model.pth'
prompt_file = '{work_dir}/motion_prompt/prompt_embedding.safetensors'
t2v_videos = dict(_base_.train_videos, tasks=('t2v', ), with_vace_context=False)

mogan_model = dict(
    type='MoGANDistiller',
    # the T2V teacher = the VACE teacher's DiT (as stage 1)
    real_score=dict(type='WanVACEScore', preset='tiny', **_base_.score_arch),
    real_score_weights=dict(checkpoint=_base_.teacher_weights, prefix='score.', ignore=['vace.']),
    # post-training starts from the stage-1 DMD student and its fake score
    generator_init=dict(type='CheckpointInit', checkpoint=stage1_weights, prefix='generator.'),
    fake_score_init=dict(type='CheckpointInit', checkpoint=stage1_weights, prefix='fake_score.'),
    dmd_loss=_base_.dmd_loss,
    denoising_loss=_base_.denoising_loss,
    otd_loss=None, gan_loss=None, discriminator=None, gen_every=None,
    # D: the teacher's first 3 of 4 blocks, heads after each (1.3B: 16 of 30, heads at 7, 13, 15)
    motion_discriminator=dict(type='MotionDiscriminator', prompt_embedding=prompt_file, num_blocks=3,
                              taps=(0, 1, 2), head_attn_dim=24, head_attn_heads=2),
    motion_gan_loss=dict(type='LogisticGANLoss', generator_weight=0.5, discriminator_weight=0.5,
                         r1_weight=0.3, r2_weight=0.3, noise_sigma=0.01),
    flow_estimator=dict(type='LucasKanadeFlow'),
    vae_checkpoint=vae_file,
    # 2 of 5 latent chunks (5 or 8 of 17 frames: 4–7 flows; 3 chunks cost 1.4× as much on CPU); the tiny
    # VAE fits without checkpointing
    decoding=dict(type='WindowedVAEDecoding', window_chunks=2, gradient_checkpointing=False),
    schedule=[dict(role='generator', objective='dm'),
              dict(role='critic', objective='denoise', repeat=4),
              dict(role='generator', objective='motion_gan'),
              dict(role='motion_discriminator', objective='motion_gan')],
    motion_gan_start_iter=0,
    # seeds the rollout's exit steps (the multi-seed table varies it with randomness.seed)
    seed=0,
    guidance_scale=_base_.teacher_guidance,
    uncond='zeros',
    use_vace_context=False)


def post_training(model, max_iters):  # noqa: E302
    return dict(
        model=model,
        train_dataloader=dict(
            batch_size=4, num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            batch_sampler=dict(type='ShapeGroupedBatchSampler'),
            collate_fn=dict(type='default_collate'),
            dataset=t2v_videos),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        # the seed of this run's noise and batches: the multi-seed table sets it per stage
        randomness=dict(seed=0, diff_rank_seed=True),
        optim_wrapper=dict(
            constructor='RoleOptimWrapperConstructor',
            generator=dict(type='OptimWrapper',
                           optimizer=dict(type='AdamW', lr=5e-5, betas=(0.0, 0.999), weight_decay=0.0),
                           clip_grad=dict(max_norm=1.0)),
            critic=dict(type='OptimWrapper',
                        optimizer=dict(type='AdamW', lr=2e-4, betas=(0.0, 0.999), weight_decay=0.0),
                        clip_grad=dict(max_norm=1.0)),
            motion_discriminator=dict(type='OptimWrapper',
                                      optimizer=dict(type='AdamW', lr=1e-4, betas=(0.0, 0.999),
                                                     weight_decay=0.0),
                                      clip_grad=dict(max_norm=1.0))))


# MoGAN Table 2: the MoGAN stage with one change each
table2_models = dict(
    # "w/o R1 & R2": the motion discriminator without its regularisers
    mogan_no_r1r2=dict(mogan_model, motion_gan_loss=dict(mogan_model['motion_gan_loss'], r1_weight=0.0,
                                                         r2_weight=0.0)),
    # "w/o optical flow": the GAN on the window's latents (no VAE decoding, no flow estimator; MoGAN §6.4),
    # the same DiT discriminator with the teacher's latent patch embedding
    mogan_video_gan=dict(mogan_model, motion_input='latents', vae_checkpoint=None, flow_estimator=None,
                         motion_discriminator=dict(mogan_model['motion_discriminator'],
                                                   type='LatentVideoDiscriminator')),
    # "w/o DMD loss": the motion GAN alone (no regulariser, so no fake-score steps), as many motion updates
    mogan_no_dmd=dict(mogan_model, dmd_loss=None,
                      schedule=[dict(role='generator', objective='motion_gan'),
                                dict(role='motion_discriminator', objective='motion_gan')]))

stage_order = ['codecs', 'teacher', 'stage1', 'motion_prompt', 'dmd_only', 'mogan', 'mogan_otd', 'mogan_no_r1r2',
               'mogan_video_gan', 'mogan_no_dmd', 'motion_eval']
stages = dict(
    # how it runs, not what it computes: a work dir where the demo's stage 1 finished still reuses it
    stage1=dict(torch_num_threads=1),
    motion_prompt=dict(call=dict(type='prepare_motion_prompt',
                                 text_encoder_checkpoint=_base_.codec_dir + '/tiny_text_encoder.pth')),
    # 5 iterations per cycle (the order without its motion steps); the gate opens after the last one
    dmd_only=dict(runner=post_training(dict(mogan_model, motion_gan_start_iter=5 * post_cycles),
                                       max_iters=5 * post_cycles)),
    mogan=dict(runner=post_training(mogan_model, max_iters=7 * post_cycles)),
    mogan_otd=dict(runner=post_training(dict(mogan_model, otd_loss=_base_.otd_loss, dm_weights=_base_.dm_weights),
                                        max_iters=7 * post_cycles)),
    mogan_no_r1r2=dict(runner=post_training(table2_models['mogan_no_r1r2'], max_iters=7 * post_cycles)),
    mogan_video_gan=dict(runner=post_training(table2_models['mogan_video_gan'], max_iters=7 * post_cycles)),
    mogan_no_dmd=dict(runner=post_training(table2_models['mogan_no_dmd'], max_iters=2 * post_cycles)),
    motion_eval=dict(call=dict(
        type='evaluate_motion',
        models=dict(stage1='{work_dir}/stage1', dmd_only='{work_dir}/dmd_only', mogan='{work_dir}/mogan',
                    mogan_otd='{work_dir}/mogan_otd', mogan_no_r1r2='{work_dir}/mogan_no_r1r2',
                    mogan_video_gan='{work_dir}/mogan_video_gan', mogan_no_dmd='{work_dir}/mogan_no_dmd'),
        # held-out prompts and clips: another seed than the training videos
        dataset=dict(t2v_videos, num_samples=16, seed=99),
        vae_checkpoint=vae_file,
        num_samples=16, seed=1234, samples_to_write=4, teacher_steps=40)),
)
