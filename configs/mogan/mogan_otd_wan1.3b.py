# MoGAN + OTD on Wan2.1-T2V-1.3B: configs/mogan/mogan_wan1.3b.py with OTD in the DMD regulariser,
# 0.8·OTD + 0.2·DMD on the regulariser's steps (VDOT's objective and weights, ../_base_/vdot_objectives.py;
# docs/DESIGN.md §5, §13). A config change only; the same command as mogan_wan1.3b.py.
_base_ = ['./mogan_wan1.3b.py']

# _delete_: the base's otd_loss is None (off), not a dict to merge into
model = dict(otd_loss=dict(_delete_=True, **_base_.otd_loss), dm_weights=dict(_base_.dm_weights))
