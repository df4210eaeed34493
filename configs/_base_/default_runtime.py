# Runtime settings shared by every vdot_ext recipe.
default_scope = 'vdot_ext'
# registers ExportGeneratorHook (below); vdot_ext.engine imports it too, which is what a
# leaf config that sets its own custom_imports relies on
custom_imports = dict(imports=['vdot_ext.engine.export_hook'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # crash-safe saving, safe loading, exact resume (vdot_ext/engine/checkpointing.py)
    checkpoint=dict(type='VDOTCheckpointHook', interval=100, by_epoch=False,
                    max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [
    dict(type='LossCurveHook', interval=50),
    # the stage hand-off (vdot_ext/engine/export_hook.py): at the end of training the
    # generator is written to <work_dir>/export/ in the Wan2.1 release layout (sharded
    # safetensors + index, config.json); with GeneratorEMAHook, export/ holds the EMA
    # weights and export_raw/ the trained ones (use_ema=False swaps: export/ + export_ema/)
    dict(type='ExportGeneratorHook', out_dir='export', use_ema=True),
]

log_processor = dict(by_epoch=False, window_size=10)
log_level = 'INFO'
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
randomness = dict(seed=0, diff_rank_seed=True)
load_from = None
resume = False
