# The stage-1 VDOT model (docs/DESIGN.md §3, §6): a VDOTDistiller on Wan2.1-T2V.
# The frozen teacher F_psi is the Wan T2V DiT; the generator G and the fake
# score F_phi start from it (Algorithm 1, Init). DMD on captions only; the
# critic trains with the denoising loss; no OTD, no GAN, no VCU context.
# A leaf config sets the preset and the weights; objectives: ../vdot_objectives.py.
_base_ = ['../vdot_objectives.py']

model = dict(
    type='VDOTDistiller',
    real_score=dict(
        type='WanVACEScore',
        preset='??? a Wan2.1 T2V preset: wan2.1-t2v-14b or wan2.1-t2v-1.3b',
        gradient_checkpointing=True,
        pretrained='??? local safetensors of the Wan2.1-T2V DiT (a folder, an index.json '
                   'or a list of shard paths)'),
    dmd_loss={{_base_.dmd_loss}},
    denoising_loss={{_base_.denoising_loss}},
    otd_loss=None, gan_loss=None, discriminator=None,
    gen_every={{_base_.gen_every}},
    # 4 generator steps, warped by shift 5 (docs/DESIGN.md §4)
    generator_timesteps=(1000, 750, 500, 250),
    generator_shift=5.0,
    score_shift=5.0,
    # Self-Forcing's stage-1 CFG: x0 = c + 3 (c - u), i.e. w = 4 in v_u + w (v_c - v_u);
    # timesteps drawn on [0, 1000), shifted, then clamped to [20, 980] (docs/DESIGN.md §12)
    guidance_scale=4.0,
    score_t_clamp='after_shift',
    uncond='negative_prompt',
    use_vace_context=False)
