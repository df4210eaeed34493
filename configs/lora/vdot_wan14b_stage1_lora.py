# VDOT stage 1 (Wan2.1-T2V-14B, DMD) with a LoRA generator (rank 32, DiffSynth
# targets q, k, v, o, ffn.0, ffn.2). Merge the LoRA (<checkpoint>/lora_generator/, peft
# layout) into full weights with vdot_ext/tools/merge_lora.py before using the result as
# stage 2's AccWanInit source.
_base_ = ['../vdot_wan14b_stage1.py']

lora_rank = 32
model = dict(
    generator_lora=dict(type='LoRAAdapter', rank=lora_rank, alpha=lora_rank, dropout=0.0,
                        target_modules=['q', 'k', 'v', 'o', 'ffn.0', 'ffn.2']))
