# VDOT stage 2 on Wan2.1-VACE-14B with a LoRA generator (peft): the student's
# linear layers q, k, v, o, ffn.0, ffn.2 (DiffSynth-Studio's Wan LoRA targets)
# get rank-32 adapters (alpha 32), injected after AccWanInit; the base weights
# stay frozen. Checkpoints hold LoRA weights only: lora_generator/ in each
# checkpoint folder, in peft's layout (adapter_model.safetensors with standard
# lora_A/lora_B keys + adapter_config.json; PeftModel.from_pretrained loads it)
# plus lora_diffsynth.safetensors (Wan release keys, for pipe.load_lora(pipe.dit, ...)
# and pipe.vace). Merge them into full weights with
#   python -m vdot_ext.tools.merge_lora --lora work_dirs/.../iter_1200.pth/lora_generator \
#     --base /ckpt/Wan2.1-VACE-14B /work/stage1/final_model.pth \
#     --out generator_merged.safetensors --release-layout
# ZeRO-3 as the full recipe (plan_memory: ZeRO-2 does not fit 141 GB with a fully
# trained fake score); the fake score stays fully trained.
_base_ = ['../vdot_wan14b.py']

lora_rank = 32
model = dict(
    generator_lora=dict(type='LoRAAdapter', rank=lora_rank, alpha=lora_rank, dropout=0.0,
                        target_modules=['q', 'k', 'v', 'o', 'ffn.0', 'ffn.2']),
    # optional: fake_score_lora=dict(type='LoRAAdapter', rank=lora_rank, alpha=lora_rank),
)
