# VDOT stage 1 (docs/DESIGN.md §6): few-step distillation of Wan2.1-T2V-14B with DMD on
# captions only; the critic (fake score) trains with the denoising loss.
# 1500 steps, lr 2e-6 (G) / 4e-7 (critic), TTUR 5, Adam betas (0, 0.999),
# batch 1 per GPU, gradient checkpointing, 4xH200 with DeepSpeed ZeRO-3 (bf16).
# The model is _base_/models/vdot_wan_t2v.py; this file sets the preset, the
# weights and the learning rates.
#
#   mim train vdot_ext configs/vdot_wan14b_stage1.py --launcher pytorch --gpus 4 \
#     --cfg-options \
#       model.real_score.pretrained=/ckpt/Wan2.1-T2V-14B \
#       train_dataloader.dataset.manifest=/data/captions.csv \
#       train_dataloader.dataset.cache_dir=/data/captions_cache
#
# It ends by writing <work_dir>/export/ (release layout), the AccWanInit source of
# configs/vdot_wan14b.py.
# Memory: python -m vdot_ext.tools.plan_memory configs/vdot_wan14b_stage1.py --gpus 4
_base_ = ['./_base_/default_runtime.py', './_base_/models/vdot_wan_t2v.py',
          './_base_/wan_vcu_training.py',
          './_base_/deepspeed_zero3.py']

model = dict(
    # F_psi: Wan2.1-T2V-14B (frozen); G and F_phi start from it (Algorithm 1, Init)
    real_score=dict(
        preset='wan2.1-t2v-14b',
        pretrained='??? local safetensors of Wan2.1-T2V-14B (a folder, an index.json '
                   'or a list of shard paths)'))

train_dataloader = dict(dataset=dict(
    manifest='??? a caption manifest (CSV or JSONL) for text-to-video distillation'))

train_cfg = dict(type='IterBasedTrainLoop', max_iters=1500)

# the paper's learning rates (docs/DESIGN.md §6)
optim_wrapper = dict(generator=dict(optimizer=dict(lr=2e-6)),
                     critic=dict(optimizer=dict(lr=4e-7)))

default_hooks = dict(checkpoint=dict(interval=100, max_keep_ckpts=3))
