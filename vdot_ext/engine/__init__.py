"""Training engine: runners, the per-role DeepSpeed strategy, optimizers, hooks
(docs/DESIGN.md §7). Imports models, never the other way (§2)."""
from . import evaluate_motion  # noqa: F401  (registers the call stages prepare_motion_prompt, evaluate_motion)
from .checkpointing import VDOTCheckpointHook  # noqa: F401
from .deepspeed_optim_wrapper import DeepSpeedRoleOptimWrapper  # noqa: F401
from .deepspeed_strategy import RoleDeepSpeedStrategy  # noqa: F401
from .ema import GeneratorEMAHook  # noqa: F401
from .evaluate_demo import evaluate_vdot  # noqa: F401
from .export_hook import ExportGeneratorHook  # noqa: F401
from .hooks import LossCurveHook  # noqa: F401
from .optim import RoleOptimWrapperConstructor  # noqa: F401
from .runner_builder import build_runner  # noqa: F401
from .validation_hook import ValidationHook  # noqa: F401
