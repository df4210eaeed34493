# MoGAN Table 2, "w/o DMD loss": the motion GAN alone (no DMD regulariser, so no fake-score steps),
# as many motion updates as the full recipe (post_cycles = 50 cycles of 2 iterations).
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o DMD'
stages = dict(
    mogan=dict(runner=dict(
        model=dict(dmd_loss=None,
                   schedule=[dict(role='generator', objective='motion_gan'),
                             dict(role='motion_discriminator', objective='motion_gan')]),
        train_cfg=dict(max_iters=100))),
    motion_eval=dict(call=dict(models=dict(_delete_=True, no_dmd='{work_dir}/mogan'))))
