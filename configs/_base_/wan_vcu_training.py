# Data loading and role optimizers shared by the real-size Wan recipes
# (stage 1 and stage 2, 14B and 1.3B): batch 1 per GPU from a precomputed VCU
# cache, Adam(W) with beta1 = 0 per role (DMD2 / VDOT). A recipe sets its
# manifest description and learning rates. Weight decay 0.01 and clipping at 5.0
# follow the public VDOT code (docs/DESIGN.md §12).
# Wan2.1's sample_neg_prompt (wan/configs/shared_config.py): encoded once per sample as
# negative_context, the teacher's unconditional branch (public VDOT code; docs/DESIGN.md §12)
wan_negative_prompt = ('色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量'
                       '，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸'
                       '形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒'
                       '着走')

train_dataloader = dict(
    batch_size=1,
    num_workers=2,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=dict(type='ShapeGroupedBatchSampler'),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='VCUManifestDataset',
        manifest='??? a VCU manifest (CSV or JSONL)',
        num_frames=81, height=480, width=832,
        negative_prompt=wan_negative_prompt,
        # VAE latents and text embeddings precomputed by
        #   python -m vdot_ext.tools.precompute_vcu MANIFEST --cache-dir DIR ...
        cache_dir='??? the cache folder written by vdot_ext.tools.precompute_vcu '
                  'for this manifest'))

optim_wrapper = dict(
    constructor='RoleOptimWrapperConstructor',
    generator=dict(type='OptimWrapper',
                   optimizer=dict(type='AdamW', lr='??? generator learning rate',
                                  betas=(0.0, 0.999), weight_decay=0.01),
                   clip_grad=dict(max_norm=5.0)),
    critic=dict(type='OptimWrapper',
                optimizer=dict(type='AdamW', lr='??? critic learning rate',
                               betas=(0.0, 0.999), weight_decay=0.01),
                clip_grad=dict(max_norm=5.0)))
