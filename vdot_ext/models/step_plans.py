"""Step plans: which role steps with which objective, in which order, at iteration k (docs/DESIGN.md §6).

A schedule is data in the config, not code in ``train_step``. ``VDOTDistiller.train_step`` asks its schedule
for the :class:`StepPlan` of iteration k and runs the plan's steps in order, each through the same guarded step
of its role (docs/DESIGN.md §11). Two registered schedules:

* ``dict(type='VDOTAlgorithm1', gen_every=5)``: VDOT's Algorithm 1 with DMD2's TTUR (:func:`vdot_step_plan`),
  the default;
* ``dict(type='CyclicStepPlan', steps=[...])``, or the list itself: a cycle of steps repeated forever. A list
  entry is one iteration (one batch). It is either one step, ``dict(role=..., objective=..., repeat=n)``, which
  ``repeat`` expands into n consecutive iterations, or a list of steps that all run in the same iteration, in
  order (there ``repeat`` expands into n consecutive steps of that iteration).

MoGAN's order (MoGAN paper, Appendix: a generator DMD step, the fake score for 4 iterations, a generator
MoGAN step, a discriminator step) is, one batch per step::

    schedule = [dict(role='generator', objective='dm'),
                dict(role='critic', objective='denoise', repeat=4),
                dict(role='generator', objective='gan'),
                dict(role='critic', objective='gan')]

The roles and objectives a model offers are checked when the model binds the schedule, so a typo or an
objective whose loss is switched off (``gan_loss=None``) is a config error naming ``model.schedule``.
"""
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from vdot_ext.registry import STEP_PLANS

__all__ = ['Step', 'StepPlan', 'vdot_step_plan', 'STEP_PLANS', 'StepSchedule', 'VDOTAlgorithm1',
           'CyclicStepPlan', 'build_schedule']

# schedules are built from config dicts; they are not models, so they have their
# own registry (vdot_ext.registry.STEP_PLANS)


@dataclass(frozen=True)
class Step:
    """One optimizer step of ``role`` on ``objective`` (e.g. ``Step('critic', 'denoise')``)."""
    role: str
    objective: str


@dataclass(frozen=True)
class StepPlan:
    """What iteration ``iteration`` does: ``steps``, run in order on the iteration's batch.

    ``generator`` / ``critic`` name the objective of that role's first step in the plan, or None when the role
    does not step (the EMA hook reads ``generator`` to skip iterations without a generator step).
    """
    iteration: int
    steps: Tuple[Step, ...]

    def objective(self, role: str) -> Optional[str]:
        return next((s.objective for s in self.steps if s.role == role), None)

    @property
    def generator(self) -> Optional[str]:
        return self.objective('generator')

    @property
    def critic(self) -> Optional[str]:
        return self.objective('critic')


def vdot_step_plan(k: int, gen_every: int, gan: bool, dm: bool) -> StepPlan:
    """Algorithm 1 + TTUR (docs/DESIGN.md §6, Eq. 21).

    The critic steps every iteration, the generator every ``gen_every``, before the critic. With the GAN on,
    even k is distribution matching (generator OTD/DMD, critic denoising) and odd k adversarial (generator and
    discriminator GAN).
    """
    adversarial = gan and k % 2 == 1
    critic = 'gan' if adversarial else 'denoise'
    generator = None
    if k % gen_every == 0:
        generator = 'gan' if adversarial else ('dm' if dm else None)
    steps = ((Step('generator', generator), ) if generator else ()) + (Step('critic', critic), )
    return StepPlan(k, steps)


class StepSchedule:
    """A schedule: :meth:`plan` maps the iteration k to a :class:`StepPlan` (a pure function of k, so a resumed
    run continues the plan exactly). :meth:`bind` checks it against the objectives a model offers."""

    def bind(self, available: Mapping[str, Iterable[str]], field: str = 'model.schedule') -> None:
        """Check (and complete) the schedule against ``available``: ``{role: objectives}``."""
        raise NotImplementedError

    def plan(self, k: int) -> StepPlan:
        raise NotImplementedError


def _check_step(step: Step, available: Mapping[str, Iterable[str]], field: str) -> None:
    if step.role not in available:
        raise ValueError(f'{field}: unknown role {step.role!r}; this model has roles {sorted(available)}')
    objectives = tuple(available[step.role])
    if step.objective not in objectives:
        raise ValueError(f'{field}: the {step.role} has no objective {step.objective!r} in this model; it has '
                         f'{list(objectives)} (an objective whose loss is None is switched off)')


@STEP_PLANS.register_module()
class VDOTAlgorithm1(StepSchedule):
    """VDOT's Algorithm 1 with TTUR: :func:`vdot_step_plan` (docs/DESIGN.md §6).

    Args:
        gen_every: the generator steps once every ``gen_every`` steps of Algorithm 1 (paper: 5, both stages).
        gan, dm: whether the GAN / the distribution-matching objective is on; None (default) takes it from the
            model when it binds the schedule (on when the model has the objective).
        accumulate: iterations (batches) per step of Algorithm 1. Step s runs on iterations
            [s·accumulate, (s + 1)·accumulate), each role with the same objective, and every trainable role's
            ``optim_wrapper.<role>.accumulative_counts`` must equal it, so each role updates once per step over
            ``accumulate`` batches: the public code's ``gradient_accumulation_steps`` (3 in
            ``configs/self_forcing_bi_gan.yaml``; ``distillation_vace.py`` ``train`` loops over that many
            batches per role before each optimizer step). The model checks the wrappers at its first step.
    """

    def __init__(self, gen_every: int = 5, gan: Optional[bool] = None, dm: Optional[bool] = None,
                 accumulate: int = 1):
        if int(gen_every) != gen_every or gen_every < 1:
            raise ValueError(f'VDOTAlgorithm1.gen_every (model.gen_every) must be an integer >= 1, '
                             f'got {gen_every!r}')
        if int(accumulate) != accumulate or accumulate < 1:
            raise ValueError(f'VDOTAlgorithm1.accumulate (model.schedule.accumulate) must be an integer >= 1, '
                             f'got {accumulate!r}')
        self.gen_every = int(gen_every)
        self.accumulate = int(accumulate)
        self.gan, self.dm = gan, dm

    def bind(self, available, field='model.schedule'):
        offered = dict(gan='gan' in tuple(available.get('critic', ())),
                       dm='dm' in tuple(available.get('generator', ())))
        for name, on in offered.items():
            wanted = getattr(self, name)
            if wanted is None:
                setattr(self, name, on)
            elif wanted and not on:
                raise ValueError(f'{field}: VDOTAlgorithm1({name}=True) but the model has no {name!r} '
                                 f'objective (its loss is None)')
        for k in range(2 * self.gen_every * self.accumulate):   # one full period: every step the plan can name
            for step in self.plan(k).steps:
                _check_step(step, available, field)

    def plan(self, k):
        if self.gan is None or self.dm is None:
            raise RuntimeError('VDOTAlgorithm1.plan: bind() the schedule to a model first (gan/dm unknown)')
        step = vdot_step_plan(k // self.accumulate, self.gen_every, self.gan, self.dm)
        return StepPlan(k, step.steps)

    def __repr__(self):
        return (f'VDOTAlgorithm1(gen_every={self.gen_every}, gan={self.gan}, dm={self.dm}, '
                f'accumulate={self.accumulate})')


StepEntry = Union[Mapping, Sequence[Mapping]]


def _steps_of(entry: Mapping, where: str) -> List[Step]:
    """``dict(role, objective, repeat=1)`` → ``repeat`` copies of the step."""
    if not isinstance(entry, Mapping):
        raise ValueError(f'{where}: a step is dict(role=..., objective=..., repeat=1), got {entry!r}')
    unknown = set(entry) - {'role', 'objective', 'repeat'}
    missing = {'role', 'objective'} - set(entry)
    if unknown or missing:
        raise ValueError(f'{where}: a step has the keys role, objective and optionally repeat; '
                         f'missing {sorted(missing)}, unknown {sorted(unknown)} in {dict(entry)!r}')
    repeat = entry.get('repeat', 1)
    if int(repeat) != repeat or repeat < 1:
        raise ValueError(f'{where}: repeat must be an integer >= 1, got {repeat!r}')
    return [Step(str(entry['role']), str(entry['objective']))] * int(repeat)


@STEP_PLANS.register_module()
class CyclicStepPlan(StepSchedule):
    """A cycle of steps, repeated forever: iteration k runs entry ``k mod period`` of the expanded cycle.

    Args:
        steps: the cycle. Each entry is one iteration: a step ``dict(role, objective, repeat=1)`` (``repeat``
            = that many iterations with this step), or a list of such steps run in order in one iteration
            (``repeat`` = that many steps in the iteration).
    """

    def __init__(self, steps: Sequence[StepEntry]):
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence) or not steps:
            raise ValueError('CyclicStepPlan.steps (model.schedule) must be a non-empty list of steps '
                             f'dict(role=..., objective=..., repeat=1) or lists of them, got {steps!r}')
        cycle: List[Tuple[Step, ...]] = []
        for i, entry in enumerate(steps):
            where = f'model.schedule[{i}]'
            if isinstance(entry, Mapping):
                cycle.extend((step, ) for step in _steps_of(entry, where))
            elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and entry:
                cycle.append(tuple(s for j, sub in enumerate(entry)
                                   for s in _steps_of(sub, f'{where}[{j}]')))
            else:
                raise ValueError(f'{where}: an entry is a step dict or a non-empty list of step dicts, '
                                 f'got {entry!r}')
        self.cycle: Tuple[Tuple[Step, ...], ...] = tuple(cycle)

    @property
    def period(self) -> int:
        return len(self.cycle)

    def bind(self, available, field='model.schedule'):
        for steps in self.cycle:
            for step in steps:
                _check_step(step, available, field)

    def plan(self, k):
        return StepPlan(k, self.cycle[k % self.period])

    def __repr__(self):
        return f'CyclicStepPlan(period={self.period}, cycle={self.cycle})'


def build_schedule(cfg, gen_every: Optional[int] = None) -> StepSchedule:
    """The schedule of a config value.

    ``None`` → ``VDOTAlgorithm1(gen_every)``; a list → :class:`CyclicStepPlan`; a dict → built from
    :data:`STEP_PLANS` (``VDOTAlgorithm1`` takes ``gen_every`` when the dict does not set it); a
    :class:`StepSchedule` is used as it is.
    """
    if cfg is None:
        return VDOTAlgorithm1(5 if gen_every is None else gen_every)
    if isinstance(cfg, StepSchedule):
        return cfg
    if isinstance(cfg, Mapping):
        cfg = dict(cfg)
        if 'type' not in cfg:
            raise ValueError(f"model.schedule: a dict needs a 'type' (one of {sorted(STEP_PLANS.module_dict)}), "
                             f'got {cfg!r}')
        if cfg['type'] in ('VDOTAlgorithm1', VDOTAlgorithm1) and gen_every is not None:
            given = cfg.setdefault('gen_every', gen_every)
            if given != gen_every:
                raise ValueError(f'model.schedule.gen_every={given} and model.gen_every={gen_every} disagree; '
                                 'set one of them')
        return STEP_PLANS.build(cfg)
    if isinstance(cfg, Sequence) and not isinstance(cfg, (str, bytes)):
        return CyclicStepPlan(cfg)
    raise ValueError(f'model.schedule must be None, a dict(type=...) of {sorted(STEP_PLANS.module_dict)}, '
                     f'or a list of steps; got {cfg!r}')
