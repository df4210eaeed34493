# The base of the ablation rows (the VDOT paper's Table 3 on the tiny recipe): the tiny demo
# (../vdot_tiny.py) with validation during stage 2, so each row also gives quality vs training
# steps (the paper's Fig. 5). One leaf per row in this folder; run rows x seeds with
#
#   python -m vdot_ext.tools.ablate --rows full no_otd --seeds 0 1 2 --work-root work_dirs/ablations
#
# (docs/DESIGN.md §12). Each leaf also runs alone: mim train vdot_ext configs/ablations/<row>.py.
_base_ = ['../vdot_tiny.py']

# registers ValidationHook (vdot_ext/engine/validation_hook.py)
custom_imports = dict(imports=['vdot_ext.engine.validation_hook'], allow_failed_imports=False)

# the label of the row in the ablation table; leaves set it
ablation_label = 'tiny recipe'

# every 200 of stage 2's 1200 iterations (and at 0): the evaluation's held-out VCUs and noise seed
stage2_validation = dict(
    type='ValidationHook',
    dataset=_base_.stages.evaluate.call.dataset,
    vae_checkpoint=_base_.stages.evaluate.call.vae_checkpoint,
    # 4 per task: a trend every 200 iterations; the final evaluation uses the recipe's 24 (and its SE)
    samples_per_task=4,
    interval=200, seed=1234)
# the recipe's hooks, plus validation in stage 2
stages = dict(stage2=dict(runner=dict(custom_hooks=_base_.custom_hooks + [stage2_validation])))
