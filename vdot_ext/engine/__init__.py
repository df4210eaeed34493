from .hooks import LossCurveHook  # noqa: F401
from .optim import RoleOptimWrapperConstructor  # noqa: F401
from .evaluate_demo import evaluate_vdot  # noqa: F401
from .deepspeed_strategy import DeepSpeedRoleOptimWrapper, RoleDeepSpeedStrategy  # noqa: F401
from .ema import GeneratorEMAHook  # noqa: F401
