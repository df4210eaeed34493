# Data loading and role optimizers shared by the real-size Wan recipes
# (stage 1 and stage 2, 14B and 1.3B): batch 1 per GPU from a precomputed VCU
# cache, Adam(W) with beta1 = 0 per role (DMD2 / VDOT). A recipe sets its
# manifest description and learning rates. Weight decay 0.01 and clipping at 5.0
# follow the public VDOT code (docs/DESIGN.md §12).
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
