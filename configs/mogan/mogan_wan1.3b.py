# MoGAN on Wan2.1-T2V-1.3B (docs/DESIGN.md §13; MoGAN §5.1 and Appendices A-B): motion-GAN
# post-training of a few-step DMD student, with the DMD regulariser.
#
#   * AdamW, lr 1e-5 (every role), 800 steps = 800 cycles of MoGAN's order: (1) generator DMD,
#     (2) fake score x 4, (3) generator motion GAN, (4) motion discriminator;
#   * batches: generator 16 (and fake score), discriminator 64, reached with one clip per GPU by
#     per-role gradient accumulation (below);
#   * D: the teacher's first 16 DiT blocks, heads after blocks 7, 13, 15, t* = 0, the fixed prompt
#     "a video with good motion" encoded once; RAFT-large flow; L = 12 latent chunks decoded with
#     gradients (48 frames; 45 when the window starts at the clip's first chunk);
#   * logistic GAN, lambda1 = lambda2 = 0.5, R1/R2 weights 0.3, sigma = 0.01;
#   * real clips from a VCU manifest of text-to-video rows (task=t2v), 81 frames at 480x832.
#
# Before training, encode D's prompt once:
#
#   python -m vdot_ext.engine.evaluate_motion prompt --device cuda --out-dir /ckpt/mogan_prompt \
#     --text-encoder /ckpt/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \
#     --tokenizer /ckpt/Wan2.1-T2V-1.3B/google/umt5-xxl
#
#   mim train vdot_ext configs/mogan/mogan_wan1.3b.py --launcher pytorch --gpus 8 \
#     --cfg-options \
#       model.real_score.pretrained=/ckpt/Wan2.1-T2V-1.3B \
#       model.generator_init.checkpoint=/work/stage1_1.3b/final_model.pth \
#       model.fake_score_init.checkpoint=/work/stage1_1.3b/final_model.pth \
#       model.motion_discriminator.prompt_embedding=/ckpt/mogan_prompt/prompt_embedding.safetensors \
#       model.vae_checkpoint=/ckpt/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
#       model.flow_estimator.weights_path=/ckpt/raft_large_C_T_SKHT_V2-ff5fadd5.pth \
#       train_dataloader.dataset.manifest=/data/motion_videos.csv \
#       train_dataloader.dataset.cache_dir=/data/motion_videos_cache
#
# The student to post-train is a DMD-distilled Wan2.1-T2V-1.3B, e.g. the run of
# configs/vdot_wan1.3b_stage1.py (a final_model.pth / iter_N.pth file or its DeepSpeed checkpoint
# folder). MoGAN's student takes 3 steps; ours keeps the steps it was distilled with (4).
_base_ = ['../_base_/default_runtime.py', '../_base_/models/vdot_wan_t2v.py',
          '../_base_/wan_vcu_training.py', '../_base_/deepspeed_zero2.py']

# the runtime's imports, plus MoGANDistiller, CheckpointInit and WarmupGatedPlan
custom_imports = dict(imports=_base_.custom_imports.imports + ['vdot_ext.models.mogan_distiller'],
                      allow_failed_imports=False)

# Batches by per-role gradient accumulation: with one clip per GPU, a role's optimizer steps once
# every `accumulative_counts` of its steps, and the schedule gives each of its steps as many
# consecutive iterations (batches). For another number of GPUs change `gpus` in this file (the
# derived values are computed when it loads); the paper's 16 GPUs need no accumulation for G.
gpus = 8
generator_batch = 16
discriminator_batch = 64
accumulate_generator = generator_batch // gpus               # 2 on 8 GPUs
accumulate_discriminator = discriminator_batch // gpus       # 8 on 8 GPUs
mogan_steps = 800
# iterations (batches) per cycle of MoGAN's order
cycle_iters = 6 * accumulate_generator + accumulate_discriminator

model = dict(
    type='MoGANDistiller',
    real_score=dict(
        preset='wan2.1-t2v-1.3b',
        pretrained='??? local safetensors of Wan2.1-T2V-1.3B (a folder, an index.json or a list of shard paths)'),
    generator_init=dict(
        type='CheckpointInit', prefix='generator.',
        checkpoint='??? the DMD-distilled few-step Wan2.1-T2V-1.3B to post-train (final_model.pth / '
                   'iter_N.pth of configs/vdot_wan1.3b_stage1.py, or its DeepSpeed checkpoint folder)'),
    fake_score_init=dict(
        type='CheckpointInit', prefix='fake_score.',
        checkpoint='??? the same DMD run (its fake score continues to track the student)'),
    gen_every=None,
    schedule=[dict(role='generator', objective='dm', repeat=accumulate_generator),
              dict(role='critic', objective='denoise', repeat=4 * accumulate_generator),
              dict(role='generator', objective='motion_gan', repeat=accumulate_generator),
              dict(role='motion_discriminator', objective='motion_gan', repeat=accumulate_discriminator)],
    # the DMD student is the warm-up of MoGAN §4.2; iterations of DMD alone before the motion GAN
    motion_gan_start_iter=0,
    motion_discriminator=dict(
        type='MotionDiscriminator',
        prompt_embedding='??? prompt_embedding.safetensors of "a video with good motion" (prepare_motion_prompt '
                         'with the umT5 encoder)',
        num_blocks=16, taps=(7, 13, 15), gradient_checkpointing=True),
    motion_gan_loss=dict(type='LogisticGANLoss', generator_weight=0.5, discriminator_weight=0.5,
                         r1_weight=0.3, r2_weight=0.3, noise_sigma=0.01),
    vae_checkpoint='??? Wan2.1_VAE.pth',
    flow_estimator=dict(
        type='RAFTFlow', variant='large', num_flow_updates=12, pairs_per_call=8,
        weights_path='??? torchvision raft_large_C_T_SKHT_V2-ff5fadd5.pth (a local file; nothing is downloaded)'),
    decoding=dict(type='WindowedVAEDecoding', window_chunks=12, gradient_checkpointing=True))

train_dataloader = dict(dataset=dict(
    manifest='??? a VCU manifest of real videos with rich motion, one text-to-video row each (task=t2v)'))

train_cfg = dict(type='IterBasedTrainLoop', max_iters=mogan_steps * cycle_iters)

# AdamW lr 1e-5 (MoGAN §5.1); betas, weight decay and clipping as the DMD recipes here
optim_wrapper = dict(
    generator=dict(optimizer=dict(lr=1e-5), accumulative_counts=accumulate_generator),
    critic=dict(optimizer=dict(lr=1e-5), accumulative_counts=accumulate_generator),
    motion_discriminator=dict(type='OptimWrapper',
                              optimizer=dict(type='AdamW', lr=1e-5, betas=(0.0, 0.999), weight_decay=0.01),
                              clip_grad=dict(max_norm=5.0),
                              accumulative_counts=accumulate_discriminator))

# checkpoints every 10 cycles
default_hooks = dict(checkpoint=dict(interval=10 * cycle_iters, max_keep_ckpts=3))
