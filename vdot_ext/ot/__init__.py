"""Optimal transport for OTD: batched, streaming log-domain Sinkhorn and the envelope gradient."""
from .reference import ReferenceResult, sinkhorn_reference  # noqa: F401
from .sinkhorn import SinkhornResult, TOL_FLOOR, envelope_gradient, marginal_errors, sinkhorn  # noqa: F401
from .streaming import available_backends, block_plan, softmin_pass  # noqa: F401
