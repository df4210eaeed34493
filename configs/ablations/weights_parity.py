# VDOT with dm_weighting='parity': OTD and DMD at their native scales (the public VDOT code:
# OTD's envelope gradient L2-normalised per frame and scaled by grad_scale 0.1).
_base_ = ['./_tiny_ablation.py']
ablation_label = "VDOT, dm_weighting='parity'"
stage2_model_changes = dict(dm_weighting='parity', otd_loss=dict(normalize='l2_frame'))
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
