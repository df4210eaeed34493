"""MoGAN's schedules as data: the paper's step order and the warm-up gate (docs/DESIGN.md §6, §13).

MoGAN (Appendix B) trains four losses in a fixed order, one batch per step::

    MOGAN_ORDER = [dict(role='generator', objective='dm'),                      # (1) DMD regulariser
                   dict(role='critic', objective='denoise', repeat=4),          # (2) fake score × 4
                   dict(role='generator', objective='motion_gan'),              # (3) MoGAN generator loss
                   dict(role='motion_discriminator', objective='motion_gan')]   # (4) D_φ + R1/R2

which :class:`~vdot_ext.models.step_plans.CyclicStepPlan` runs as it is. MoGAN §4.2 first warms the generator up
"so that it can produce sufficiently clean intermediate predictions" before the flow GAN starts.
:class:`WarmupGatedPlan` is that gate as a schedule: before ``start_iter`` the gated objectives are skipped (by
default the same cycle with the gated steps taken out: the DMD regulariser and the fake score only); from
``start_iter`` on the full plan runs, from the start of its cycle. Like every schedule it is a pure function of
the iteration k, so a resumed run continues it exactly.
"""
from typing import Optional, Sequence

from vdot_ext.registry import STEP_PLANS

from .step_plans import CyclicStepPlan, StepPlan, StepSchedule, build_schedule

__all__ = ['MOGAN_ORDER', 'MOTION_OBJECTIVE', 'WarmupGatedPlan', 'accumulated_order']

#: the objective name of both motion-GAN steps (generator and motion discriminator)
MOTION_OBJECTIVE = 'motion_gan'

#: MoGAN paper, Appendix B: the order of the four updates (one batch per step)
MOGAN_ORDER = [dict(role='generator', objective='dm'),
               dict(role='critic', objective='denoise', repeat=4),
               dict(role='generator', objective=MOTION_OBJECTIVE),
               dict(role='motion_discriminator', objective=MOTION_OBJECTIVE)]


def accumulated_order(generator: int = 1, critic: int = 1, discriminator: int = 1, order=None) -> list:
    """``order`` (default :data:`MOGAN_ORDER`) with each step repeated over as many consecutive iterations
    (batches) as its role accumulates gradients (the role's ``optim_wrapper.accumulative_counts``), so that
    one optimizer update of a role sees that many batches and every accumulation window holds one objective.

    E.g. the paper's batches (generator 16, discriminator 64) on 8 GPUs with one clip each:
    ``accumulated_order(generator=2, critic=2, discriminator=8)``.
    """
    counts = dict(generator=generator, critic=critic, motion_discriminator=discriminator)
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise ValueError(f'accumulated_order: {name} accumulation must be an integer >= 1, got {value!r}')
    out = []
    for entry in (MOGAN_ORDER if order is None else order):
        entry = dict(entry)
        entry['repeat'] = int(entry.get('repeat', 1)) * int(counts.get(entry['role'], 1))
        out.append(entry)
    return out


@STEP_PLANS.register_module()
class WarmupGatedPlan(StepSchedule):
    """Runs ``warmup`` before iteration ``start_iter`` and ``plan`` from then on (MoGAN §4.2's warm-up).

    Args:
        plan: the schedule after the warm-up: a list of steps (a :class:`CyclicStepPlan`), a
            ``dict(type=...)`` of ``STEP_PLANS``, or a schedule. Iteration ``start_iter`` runs the plan's
            iteration 0.
        start_iter: iterations (batches) of warm-up (>= 0; 0 = no warm-up).
        gated_objectives: objectives that never run before ``start_iter`` (default: the motion GAN).
        warmup: the schedule before ``start_iter``; None = ``plan``'s cycle without the gated steps (``plan``
            must then be cyclic; iterations left empty are dropped from the cycle).
    """

    def __init__(self, plan, start_iter: int = 0, gated_objectives: Sequence[str] = (MOTION_OBJECTIVE, ),
                 warmup=None):
        if isinstance(start_iter, bool) or int(start_iter) != start_iter or start_iter < 0:
            raise ValueError(f'WarmupGatedPlan.start_iter (model.motion_gan_start_iter) must be an integer >= 0, '
                             f'got {start_iter!r}')
        if isinstance(gated_objectives, str) or not gated_objectives:
            raise ValueError(f'WarmupGatedPlan.gated_objectives must be a non-empty list of objective names, '
                             f'got {gated_objectives!r}')
        self.start_iter = int(start_iter)
        self.gated = tuple(str(name) for name in gated_objectives)
        self.plan_after = build_schedule(plan)
        if isinstance(self.plan_after, WarmupGatedPlan):
            raise ValueError('WarmupGatedPlan.plan is itself a WarmupGatedPlan; give one gate (one start_iter)')
        self.warmup: Optional[StepSchedule] = None
        if warmup is not None:
            self.warmup = build_schedule(warmup)
        elif self.start_iter > 0:
            self.warmup = self._ungated_cycle(self.plan_after)

    def _ungated_cycle(self, plan: StepSchedule) -> CyclicStepPlan:
        if not isinstance(plan, CyclicStepPlan):
            raise ValueError(f'WarmupGatedPlan: the warm-up can only be derived from a cyclic plan (a list of '
                             f'steps); {plan!r} is not one, so give `warmup` explicitly')
        cycle = [[dict(role=s.role, objective=s.objective) for s in steps if s.objective not in self.gated]
                 for steps in plan.cycle]
        cycle = [entry for entry in cycle if entry]
        if not cycle:
            raise ValueError(f'WarmupGatedPlan: every step of the plan is gated ({list(self.gated)}), so the '
                             f'warm-up of start_iter={self.start_iter} iterations would train nothing; add a '
                             'step that is not gated (e.g. the DMD regulariser) or set start_iter=0')
        return CyclicStepPlan(cycle)

    def bind(self, available, field='model.schedule'):
        self.plan_after.bind(available, field)
        if self.warmup is not None:
            self.warmup.bind(available, f'{field} (warm-up)')
            # a warm-up plan names its steps only through plan(k): check one full cycle, or 1000 iterations
            period = getattr(self.warmup, 'period', 1000)
            for k in range(min(period, self.start_iter)):
                gated = [s for s in self.warmup.plan(k).steps if s.objective in self.gated]
                if gated:
                    raise ValueError(f'{field}: the warm-up runs {gated[0]} at iteration {k}, before '
                                     f'start_iter={self.start_iter}, but {gated[0].objective!r} is gated')

    def is_warmup(self, k: int) -> bool:
        return k < self.start_iter

    def plan(self, k):
        if self.is_warmup(k):
            return StepPlan(k, self.warmup.plan(k).steps)
        return StepPlan(k, self.plan_after.plan(k - self.start_iter).steps)

    def __repr__(self):
        return (f'WarmupGatedPlan(start_iter={self.start_iter}, gated={self.gated}, warmup={self.warmup!r}, '
                f'plan={self.plan_after!r})')
