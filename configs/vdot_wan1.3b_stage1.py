# VDOT stage 1 on Wan2.1-T2V-1.3B: configs/vdot_wan14b_stage1.py with the 1.3B
# architecture and DeepSpeed ZeRO-2 (bf16; the 1.3B roles fit one GPU each).
#
#   mim train vdot_ext configs/vdot_wan1.3b_stage1.py --launcher pytorch --gpus 4 \
#     --cfg-options \
#       model.real_score.pretrained=/ckpt/Wan2.1-T2V-1.3B \
#       train_dataloader.dataset.manifest=/data/captions.csv \
#       train_dataloader.dataset.cache_dir=/data/captions_cache
#
# It ends by writing <work_dir>/export/ (release layout), the AccWanInit source of
# configs/vdot_wan1.3b.py.
# Memory: python -m vdot_ext.tools.plan_memory configs/vdot_wan1.3b_stage1.py --gpus 4
_base_ = ['./vdot_wan14b_stage1.py']

model = dict(
    # F_psi: Wan2.1-T2V-1.3B (frozen); G and F_phi start from it (Algorithm 1, Init)
    real_score=dict(
        preset='wan2.1-t2v-1.3b',
        pretrained='??? local safetensors of Wan2.1-T2V-1.3B (a folder, an index.json '
                   'or a list of shard paths)'))

# ZeRO-2: optimizer states and gradients partitioned, weights replicated
strategy = dict(config=dict(zero_optimization=dict(stage=2)))
