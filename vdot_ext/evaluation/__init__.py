from . import condition_fidelity  # noqa: F401  (module; functions: condition_fidelity.condition_fidelity, .psnr)
