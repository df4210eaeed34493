# VDOT stage 2 on VACE-Wan2.1-1.3B: configs/vdot_wan14b.py with the 1.3B
# architecture (30 blocks): discriminator taps 13, 21, 29 (paper / public code),
# DeepSpeed ZeRO-2 (bf16).
#
#   mim train vdot_ext configs/vdot_wan1.3b.py --launcher pytorch --gpus 4 \
#     --cfg-options \
#       model.real_score.pretrained=/ckpt/Wan2.1-VACE-1.3B \
#       model.generator_init.source=work_dirs/vdot_wan1.3b_stage1/export \
#       train_dataloader.dataset.manifest=/data/vcu/train.csv
_base_ = ['./vdot_wan14b.py']

model = dict(
    real_score=dict(
        preset='wan2.1-vace-1.3b',
        pretrained='??? local safetensors of Wan2.1-VACE-1.3B (one set of files '
                   'holds the DiT and the VACE blocks)'),
    generator_init=dict(
        # the export of `mim train vdot_ext configs/vdot_wan1.3b_stage1.py` (its default work dir)
        source='work_dirs/vdot_wan1.3b_stage1/export'),
    discriminator=dict(taps=(13, 21, 29)))

# ZeRO-2: optimizer states and gradients partitioned, weights replicated
strategy = dict(config=dict(zero_optimization=dict(stage=2)))
