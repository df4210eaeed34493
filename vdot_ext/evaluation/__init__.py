from . import (
    condition_fidelity,  # noqa: F401  (module; functions: condition_fidelity.condition_fidelity, .psnr)
    motion_metrics,  # noqa: F401  (module; functions: motion_metrics.motion_metrics, .dynamic_degree, .warping_error)
)
