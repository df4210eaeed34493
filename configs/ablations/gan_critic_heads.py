# VDOT with the critic's GAN step training the discriminator heads only (Algorithm 1, line 22).
_base_ = ['./_tiny_ablation.py']
ablation_label = "VDOT, gan_critic_trains='heads'"
stage2_model_changes = dict(gan_critic_trains='heads')
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
