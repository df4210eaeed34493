"""Optimal transport for OTD: batched, streaming log-domain Sinkhorn and the envelope gradient.

Layout (docs/DESIGN.md §9): ``problem`` (checked, centred clouds and the compute precision), ``steps`` (one
Sinkhorn iteration per backend behind one interface), ``schedule`` (stopping rule, over-relaxation, ε-scaling),
``sinkhorn`` (the driver loop, the result, the envelope gradient), ``streaming`` / ``cpu_kernel`` /
``triton_sinkhorn`` (the softmin kernels), ``reference`` (dense float64 solver for tests).
"""
from .problem import PRECISION_LIMIT, CentredProblem, Precision  # noqa: F401
from .reference import ReferenceResult, sinkhorn_reference  # noqa: F401
from .sinkhorn import TOL_FLOOR, SinkhornResult, envelope_gradient, marginal_errors, sinkhorn  # noqa: F401
from .steps import FusedCPUStep, SinkhornStep, StreamingStep, make_step  # noqa: F401
from .streaming import available_backends, block_plan, softmin_pass  # noqa: F401
