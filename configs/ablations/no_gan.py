# Table 3, row (3): no GAN (DMD + OTD, AccWanInit). The evaluation builds the model without
# the discriminator too, so the stage-2 weights load strictly.
_base_ = ['./_tiny_ablation.py']
ablation_label = '(3) no GAN: DMD + OTD, AccWanInit'
stage2_model_changes = dict(discriminator=None, gan_loss=None)
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
