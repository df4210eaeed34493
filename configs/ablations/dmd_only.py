# Table 3, row (2): DMD only, the Self-Forcing recipe (no OTD, no GAN; DMD weight 1 as Self-Forcing's).
_base_ = ['./_tiny_ablation.py']
ablation_label = '(2) DMD only (Self-Forcing), AccWanInit'
stage2_model_changes = dict(otd_loss=None, discriminator=None, gan_loss=None, dm_weights=None)
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
