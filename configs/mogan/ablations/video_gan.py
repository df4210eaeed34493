# MoGAN Table 2, "w/o optical flow" (a video-space GAN on latents): the recipe's mogan_video_gan stage
# alone (../mogan_tiny.py).
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o optical flow (video-space GAN)'
stages = dict(
    mogan=dict(_delete_=True, runner=_base_.stages.mogan_video_gan.runner),
    motion_eval=dict(call=dict(models=dict(_delete_=True, video_gan='{work_dir}/mogan'))))
