# VDOT with dm_weighting='balanced' (the default, spelled out): both terms as displacements on DMD's
# scale, so 0.8 / 0.2 weigh commensurable steps (OTD gives its raw envelope gradient: normalize='none').
_base_ = ['./_tiny_ablation.py']
ablation_label = "VDOT, dm_weighting='balanced'"
stage2_model_changes = dict(dm_weighting='balanced', otd_loss=dict(normalize='none'))
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
