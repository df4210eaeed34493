# Table 3, row (4): no OTD (DMD + GAN, AccWanInit); only the OTD term is removed (DMD keeps weight 0.2).
_base_ = ['./_tiny_ablation.py']
ablation_label = '(4) no OTD: DMD + GAN, AccWanInit'
stage2_model_changes = dict(otd_loss=None)
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
