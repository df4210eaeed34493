# VDOT with the critic's GAN step training the fake score and the heads (the public VDOT code).
_base_ = ['./_tiny_ablation.py']
ablation_label = "VDOT, gan_critic_trains='fake_score_and_heads'"
stage2_model_changes = dict(gan_critic_trains='fake_score_and_heads')
stages = dict(stage2=dict(runner=dict(model=stage2_model_changes)),
              evaluate=dict(call=dict(model=stage2_model_changes)))
