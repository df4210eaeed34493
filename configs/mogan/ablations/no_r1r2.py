# MoGAN Table 2, "w/o R1 & R2": the recipe's mogan_no_r1r2 stage alone (../mogan_tiny.py).
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o R1/R2'
stages = dict(
    mogan=dict(_delete_=True, runner=_base_.stages.mogan_no_r1r2.runner),
    motion_eval=dict(call=dict(models=dict(_delete_=True, no_r1r2='{work_dir}/mogan'))))
