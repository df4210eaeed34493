# RoleDeepSpeedStrategy with ZeRO-2 (optimizer states and gradients partitioned,
# weights replicated): for models that fit one GPU per role (1.3B, LoRA 14B on
# H200). The frozen teacher is placed on every GPU in bf16.
strategy = dict(
    type='RoleDeepSpeedStrategy',
    config=dict(
        # check_grad_overflow: DeepSpeed's overflow check, through which a
        # non-finite step is skipped (DeepSpeedRoleOptimWrapper)
        bf16=dict(enabled=True, check_grad_overflow=True),
        zero_optimization=dict(stage=2, overlap_comm=True, contiguous_gradients=True,
                               reduce_bucket_size=5e8, allgather_bucket_size=5e8)),
    roles=dict(),
)
