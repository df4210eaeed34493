# The VDOT stage-2 objectives (docs/DESIGN.md §5, §6; VDOT paper §4, Algorithm 1).
# Every entry can be replaced or set to None in a config: that is an ablation.

# OTD: per-latent-frame tokens after 2x2 average pooling, entropic OT with
# eps = 0.1 and 60 log-domain Sinkhorn iterations, envelope-theorem gradient,
# L2-normalised per frame, scaled by 0.1.
otd_loss = dict(type='OTDLoss', epsilon=0.1, num_iters=60, pool_kernel=2,
                normalize='l2_frame', grad_scale=0.1)
# DMD (Self-Forcing form): grad = x0_fake - x0_real, / mean|x - x0_real|.
dmd_loss = dict(type='DMDLoss', normalize='mean_abs')
denoising_loss = dict(type='DenoisingLoss')
# Relativistic GAN on register-token discriminator logits, weight 0.1.
gan_loss = dict(type='RelativisticGANLoss', loss_weight=0.1)
# Generator objective on distribution-matching steps: 0.8 OTD + 0.2 DMD.
dm_weights = dict(otd=0.8, dmd=0.2)
# TTUR: the generator steps once every 5 critic steps.
gen_every = 5
