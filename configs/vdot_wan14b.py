# VDOT stage 2 on Wan2.1-VACE-14B with the paper's hyperparameters (docs/DESIGN.md §6):
# AccWanInit (VACE-14B whose Wan blocks come from a few-step Wan2.1-T2V-14B),
# OTD + DMD / GAN alternating, TTUR 5, 1200 steps, lr 1e-6 (G) / 4e-7 (critic),
# Adam betas (0, 0.999), batch 1 per GPU, gradient checkpointing; where the paper
# is silent, the authors' code: each of the 1200 steps accumulates 3 batches per
# role (gradient_accumulation_steps 3), so the run is 3600 iterations.
# The model is _base_/models/vdot_wan_vace.py; this file sets the preset, the
# weights, the discriminator taps and the learning rates.
#
#   mim train vdot_ext configs/vdot_wan14b.py --launcher pytorch --gpus 4 \
#     --cfg-options \
#       model.real_score.pretrained=/ckpt/Wan2.1-VACE-14B \
#       model.generator_init.source=work_dirs/vdot_wan14b_stage1/export \
#       train_dataloader.dataset.manifest=/data/vcu/train.csv \
#       train_dataloader.dataset.cache_dir=/data/vcu/cache
#
# Every '??? ...' value below is required; training refuses to start until all
# are set and names the missing ones.
_base_ = ['./_base_/default_runtime.py', './_base_/models/vdot_wan_vace.py',
          './_base_/wan_vcu_training.py',
          './_base_/deepspeed_zero3.py']  # one DeepSpeed engine per role

model = dict(
    # F_psi (frozen); G and F_phi start from it (Algorithm 1, Init)
    real_score=dict(
        preset='wan2.1-vace-14b',
        pretrained='??? local safetensors of Wan2.1-VACE-14B (a folder, an index.json or a list of '
                   'shard paths)'),
    generator_init=dict(
        # the export that `mim train vdot_ext configs/vdot_wan14b_stage1.py` writes at its end
        # (its default work dir); any release-layout folder, training checkpoint or DeepSpeed
        # checkpoint folder of a step-distilled Wan2.1-T2V-14B works too
        source='work_dirs/vdot_wan14b_stage1/export'),
    # register tokens on fake-score blocks 23, 31, 39 (of 40)
    discriminator=dict(taps=(23, 31, 39)))

train_dataloader = dict(dataset=dict(
    manifest='??? a VCU manifest (CSV or JSONL) of the multi-task training data'))

# 1200 steps of Algorithm 1 (the paper) x 3 batches each = 3600 iterations
train_cfg = dict(type='IterBasedTrainLoop', max_iters=3600)

# the paper's learning rates (docs/DESIGN.md §6); each role accumulates the 3 batches
# of a step (model.schedule.accumulate in _base_/models/vdot_wan_vace.py; to change
# it, set it, both accumulative_counts and max_iters together: the model refuses
# wrappers that disagree with the schedule)
optim_wrapper = dict(generator=dict(optimizer=dict(lr=1e-6), accumulative_counts=3),
                     critic=dict(optimizer=dict(lr=4e-7), accumulative_counts=3))

# every 100 steps (300 iterations): a multiple of the accumulation, so a resume starts on a window's first batch
default_hooks = dict(checkpoint=dict(interval=300, max_keep_ckpts=3))
env_cfg = dict(dist_cfg=dict(backend='nccl'))
