# MoGAN Table 2, "w/o DMD loss": the recipe's mogan_no_dmd stage alone (../mogan_tiny.py).
_base_ = ['./_tiny_ablation.py']
ablation_label = 'MoGAN w/o DMD'
stages = dict(
    mogan=dict(_delete_=True, runner=_base_.stages.mogan_no_dmd.runner),
    motion_eval=dict(call=dict(models=dict(_delete_=True, no_dmd='{work_dir}/mogan'))))
