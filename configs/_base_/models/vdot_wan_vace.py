# The stage-2 VDOT model (docs/DESIGN.md §3, §5, §6): a VDOTDistiller on
# VACE-Wan2.1. The frozen teacher F_psi is VACE-Wan; the generator G starts
# from AccWanInit (VACE whose Wan blocks come from the stage-1 few-step Wan
# T2V), the fake score F_phi from the teacher. OTD + DMD / GAN alternating
# (0.8 OTD + 0.2 DMD), register-token discriminator on fake-score hidden
# states, relativistic GAN, TTUR 5.
# A leaf config sets the preset, the weights and the discriminator taps;
# objectives: ../vdot_objectives.py.
_base_ = ['../vdot_objectives.py']

model = dict(
    type='VDOTDistiller',
    real_score=dict(
        type='WanVACEScore',
        preset='??? a VACE-Wan2.1 preset: wan2.1-vace-14b or wan2.1-vace-1.3b',
        gradient_checkpointing=True,
        pretrained='??? local safetensors of VACE-Wan2.1 (one set of files holds the DiT '
                   'and the VACE blocks)'),
    generator_init=dict(
        type='VACEAccWanInit',
        source='??? the stage-1 few-step Wan2.1-T2V of the same size (the stage-1 run\'s '
               'export/ folder, a training or DeepSpeed checkpoint, or a step-distilled release)',
        source_prefix='generator.'),
    # one register token per tap, 512-d bottleneck, on fake-score blocks `taps`
    discriminator=dict(type='RegisterTokenDiscriminator',
                       taps='??? three fake-score block indices (14B: (23, 31, 39); 1.3B: (13, 21, 29))',
                       tokens_per_tap=1, bottleneck_dim=512, num_heads=8, use_time_emb=True),
    otd_loss={{_base_.otd_loss}},
    # public VDOT stage 2 scales the DMD gradient by sigma = t/1000
    # (hhhh1138/VDOT training/model/bi_dmd_gan.py, _compute_kl_grad; docs/DESIGN.md §12)
    dmd_loss=dict(type='DMDLoss', normalize='sigma'),
    denoising_loss={{_base_.denoising_loss}},
    gan_loss={{_base_.gan_loss}},
    dm_weights={{_base_.dm_weights}},
    gen_every={{_base_.gen_every}},
    # each step of Algorithm 1 over 3 batches per role: the authors' gradient_accumulation_steps
    # (hhhh1138/VDOT training/configs/self_forcing_bi_gan.yaml; docs/DESIGN.md §6); the leaf's
    # optim_wrapper.<role>.accumulative_counts must equal it
    schedule=dict(type='VDOTAlgorithm1', accumulate=3),
    # 4 generator steps, warped by shift 5; GAN timesteps by shift 12 (docs/DESIGN.md §4)
    generator_timesteps=(1000, 750, 500, 250),
    generator_shift=5.0,
    score_shift=5.0,
    gan_shift=12.0,
    # teacher CFG v_u + 3 (v_c - v_u) with the Wan negative prompt as v_u
    # (public VDOT configs/self_forcing_bi_gan.yaml; docs/DESIGN.md §12)
    guidance_scale=3.0,
    uncond='negative_prompt',
    use_vace_context=True)
