# MoGAN Table 2, "w/o optical flow": the GAN on the window's latents (no VAE decoding, no flow
# estimator; MoGAN §6.4), the same DiT discriminator with the teacher's latent patch embedding.
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o optical flow (video-space GAN)'
stages = dict(
    mogan=dict(runner=dict(model=dict(
        motion_input='latents', vae_checkpoint=None, flow_estimator=None,
        motion_discriminator=dict(type='LatentVideoDiscriminator')))),
    motion_eval=dict(call=dict(models=dict(_delete_=True, video_gan='{work_dir}/mogan'))))
