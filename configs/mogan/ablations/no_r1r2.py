# MoGAN Table 2, "w/o R1 & R2": the motion discriminator without its regularisers.
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o R1/R2'
stages = dict(
    mogan=dict(runner=dict(model=dict(motion_gan_loss=dict(r1_weight=0.0, r2_weight=0.0)))),
    motion_eval=dict(call=dict(models=dict(_delete_=True, no_r1r2='{work_dir}/mogan'))))
