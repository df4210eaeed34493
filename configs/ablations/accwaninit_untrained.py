# Table 3, row (1): AccWanInit without training, the VACE teacher with the stage-1 Wan blocks
# evaluated as it is (stage 2 runs 0 iterations and saves the initialised model).
_base_ = ['./_tiny_ablation.py']
ablation_label = '(1) AccWanInit, no stage-2 training'
stages = dict(stage2=dict(runner=dict(train_cfg=dict(max_iters=0))))
# what makes the row: --cfg-options of vdot_ext.tools.ablate that shorten every row leave it as it is
ablation_fixed = ['stages.stage2.runner.train_cfg.max_iters']
