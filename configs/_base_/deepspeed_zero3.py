# RoleDeepSpeedStrategy (vdot_ext/engine/deepspeed_strategy.py): one DeepSpeed
# engine per trainable role (generator; fake score + discriminator heads), the
# frozen teacher partitioned by a ZeRO-3 engine without optimizer. bf16 weights
# with fp32 master weights and Adam states. The role optim_wrapper entries'
# clip_grad=dict(max_norm=...) / accumulative_counts become each engine's
# gradient_clipping / gradient_accumulation_steps.
strategy = dict(
    type='RoleDeepSpeedStrategy',
    config=dict(
        # check_grad_overflow: DeepSpeed's overflow check, through which a
        # non-finite step is skipped (DeepSpeedRoleOptimWrapper)
        bf16=dict(enabled=True, check_grad_overflow=True),
        zero_optimization=dict(
            stage=3,
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_bucket_size=5e8,
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e6,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9)),
    # per-role overrides, e.g. critic=dict(gradient_clipping=1.0)
    roles=dict(),
)
