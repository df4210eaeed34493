# The tiny two-stage demo with a LoRA student in stage 2 (rank 8 on the tiny
# VACE generator's q, k, v, o, ffn.0, ffn.2). The evaluation builds the same
# LoRA model so the stage-2 weights load into it.
_base_ = ['../vdot_tiny.py']

tiny_lora = dict(type='LoRAAdapter', rank=8, alpha=8, dropout=0.0,
                 target_modules=['q', 'k', 'v', 'o', 'ffn.0', 'ffn.2'])
stages = dict(
    stage2=dict(runner=dict(model=dict(generator_lora=tiny_lora))),
    evaluate=dict(call=dict(model=dict(generator_lora=tiny_lora))))
