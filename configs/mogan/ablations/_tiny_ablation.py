# One MoGAN Table-2 row of the tiny recipe (../mogan_tiny.py, which runs every row in one work dir)
# alone: its stage of the recipe as the `mogan` stage of a recipe of its own, and its motion
# evaluation. Each row runs in its own work dir; copy the shared stages from a finished tiny run to
# skip them:
#
#   mkdir -p work_dirs/mogan_no_r1r2
#   cp -r work_dirs/mogan_tiny/{codecs,data,teacher,stage1,motion_prompt} work_dirs/mogan_no_r1r2/
#   mim train vdot_ext configs/mogan/ablations/no_r1r2.py --work-dir work_dirs/mogan_no_r1r2
_base_ = ['../mogan_tiny.py']

ablation_label = 'MoGAN (tiny)'
stage_order = ['codecs', 'teacher', 'stage1', 'motion_prompt', 'mogan', 'motion_eval']
# leaves name their row in metrics.json (models=dict(_delete_=True, <row>='{work_dir}/mogan'))
stages = dict(motion_eval=dict(call=dict(models=dict(_delete_=True, mogan='{work_dir}/mogan'))))
