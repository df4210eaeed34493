# The tiny two-stage demo, unchanged, on RoleDeepSpeedStrategy (ZeRO-3, fp32:
# DeepSpeed's CPU accelerator with gloo works without a GPU).
#   mim train vdot_ext configs/deepspeed/vdot_tiny_zero3.py --launcher none
#   torchrun --nproc_per_node 2 vdot_ext/tools/train.py configs/deepspeed/vdot_tiny_zero3.py --launcher pytorch
_base_ = ['../vdot_tiny.py']

strategy = dict(type='RoleDeepSpeedStrategy',
                config=dict(zero_optimization=dict(stage=3)))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
