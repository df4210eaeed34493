# Table 3, row (5): no AccWanInit: the stage-2 generator starts from the VACE teacher itself
# (DMD + OTD + GAN).
_base_ = ['./_tiny_ablation.py']
ablation_label = '(5) no AccWanInit: DMD + OTD + GAN from the teacher'
stage2_model_changes = dict(generator_init=None)
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
