"""Checks that run on a config before anything is built (docs/DESIGN.md §11).

A mistake in a config must surface before any work, not after stages 1..N-1
have trained for hours:

* :func:`check_required_fields`: values still set to the ``'??? what'`` marker;
* :func:`check_cfg_options`: ``--cfg-options`` keys that match nothing in the
  config (a typo would otherwise add a key nobody reads), with close matches;
* :func:`check_build_specs`: every ``dict(type=...)`` names a registered type
  and only keywords its constructor takes;
* :func:`check_distributed_launch`: a config without ``strategy`` launched
  on several processes.

Errors are :class:`ConfigCheckError` (a ``ValueError``) naming the config
file, the dotted path of the field and what was expected.
"""
import difflib
import inspect
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

REQUIRED = '???'


class ConfigCheckError(ValueError):
    """A config is wrong in a way found before anything was built."""


# ---------------------------------------------------------------------------
# required '???' values
# ---------------------------------------------------------------------------
def find_required_fields(cfg: Any, prefix: str = '') -> List[Tuple[str, str]]:
    """Dotted paths of values still set to the ``'??? description'`` marker.

    Configs mark fields the user must fill (weight paths, data) with a string
    starting with ``???`` followed by what is expected.
    """
    found = []
    if isinstance(cfg, str):
        if cfg.startswith(REQUIRED):
            found.append((prefix, cfg[len(REQUIRED):].strip()))
    elif isinstance(cfg, dict):
        for key, value in cfg.items():
            found += find_required_fields(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            found += find_required_fields(value, f'{prefix}.{i}')
    return found


def check_required_fields(cfg: Any, filename: str = 'config', prefix: str = '') -> None:
    """Raise one error listing every unset required field of ``cfg``."""
    missing = find_required_fields(_plain(cfg), prefix)
    if missing:
        lines = '\n'.join(f'  {path}: {what}' for path, what in missing)
        raise ConfigCheckError(
            f'{filename}: required field(s) not set:\n{lines}\n'
            'set them in the config or with --cfg-options KEY=VALUE')


# ---------------------------------------------------------------------------
# --cfg-options keys
# ---------------------------------------------------------------------------
def config_paths(cfg: Any, prefix: str = '') -> List[str]:
    """Every dotted path of ``cfg`` (inner nodes and leaves; list items by index)."""
    paths = []
    if isinstance(cfg, dict):
        items = cfg.items()
    elif isinstance(cfg, (list, tuple)):
        items = enumerate(cfg)
    else:
        return paths
    for key, value in items:
        path = f'{prefix}.{key}' if prefix else str(key)
        paths.append(path)
        paths += config_paths(value, path)
    return paths


def _lookup(cfg: Any, key: str) -> Tuple[bool, str, Any]:
    """Walk ``key`` (dotted) into ``cfg``: (found, deepest existing path, its value)."""
    node, walked = cfg, ''
    for part in key.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif part == '_delete_' and isinstance(node, dict):
            return True, walked, node     # mmengine's replace-whole-dict marker
        else:
            return False, walked, node
        walked = f'{walked}.{part}' if walked else part
    return True, walked, node


def check_cfg_options(cfg: Any, options: Dict[str, Any], allow_new: bool = False,
                      filename: str = 'config') -> None:
    """Refuse ``--cfg-options`` keys that match nothing in ``cfg``.

    mmengine's ``merge_from_dict`` adds any key it is given, so a typo
    (``otd_los.epsilon=0.05``) would silently train the unchanged recipe.
    A key whose parent is a ``dict(type=...)`` whose constructor takes that
    keyword is accepted: it sets an argument the config leaves at its default,
    and the constructor's signature has already ruled out a typo. Every other
    unknown key is reported with the closest existing paths (difflib).
    ``allow_new=True`` (``--cfg-options-allow-new``) accepts new keys.
    """
    if allow_new or not options:
        return
    plain = _plain(cfg)
    paths = None
    problems = []
    for key in options:
        found, walked, node = _lookup(plain, key)
        if found or _is_runner_setting(plain, walked, key):
            continue
        if isinstance(node, dict) and _keyword_hint(node, key[len(walked):].lstrip('.')):
            continue   # a constructor keyword left at its default
        if paths is None:
            paths = config_paths(plain)
        close = difflib.get_close_matches(key, paths, n=3, cutoff=0.6)
        line = f'  {key}: no such key'
        if walked and isinstance(node, dict):
            line += f' ({walked} has {sorted(map(str, node))})'
        elif walked:
            line += f' ({walked} is a {type(node).__name__}, not a dict)'
        if close:
            line += f'; did you mean {" or ".join(close)}?'
        problems.append(line)
    if problems:
        raise ConfigCheckError(
            f'{filename}: --cfg-options key(s) that match nothing in the config:\n'
            + '\n'.join(problems)
            + '\nfix the key, or pass --cfg-options-allow-new to add new keys on purpose')


def runner_settings() -> set:
    """The keyword names of mmengine's ``Runner`` and ``FlexibleRunner``: the
    settings a runner config may hold at its top level."""
    from mmengine.runner import FlexibleRunner, Runner
    names = set()
    for cls in (Runner, FlexibleRunner):
        names |= set(_keywords(cls)[0])
    return names - {'cfg'}


def _is_runner_setting(cfg: dict, walked: str, key: str) -> bool:
    """A new top-level Runner setting (``experiment_name=...``) of the config
    itself or of a stage's runner (``stages.<name>.runner.<setting>``)."""
    rest = key[len(walked):].lstrip('.') if walked else key
    if '.' in rest:
        return False
    parts = walked.split('.') if walked else []
    is_runner = not parts or (len(parts) == 3 and parts[0] == 'stages' and parts[2] == 'runner')
    return is_runner and rest in runner_settings()


def _keyword_hint(spec: dict, rest: str) -> Optional[str]:
    name = rest.split('.')[0]
    if '.' in rest or not isinstance(spec.get('type'), str):
        return None
    obj, _ = lookup_type(spec['type'])
    if obj is not None and name in _keywords(obj)[0]:
        return f'it is a keyword of {spec["type"]} that the config leaves at its default'
    return None


# ---------------------------------------------------------------------------
# registered types and constructor keywords
# ---------------------------------------------------------------------------
# which registry a build spec under this key belongs to (mmengine's Runner
# builds these fields from these registries); nested specs inherit the hint
_REGISTRY_HINTS = {
    'model': 'MODELS', 'data_preprocessor': 'MODELS',
    'dataset': 'DATASETS', 'sampler': 'DATA_SAMPLERS', 'batch_sampler': 'DATA_SAMPLERS',
    'collate_fn': 'FUNCTIONS', 'call': 'FUNCTIONS',
    'train_cfg': 'LOOPS', 'val_cfg': 'LOOPS', 'test_cfg': 'LOOPS',
    'optim_wrapper': 'OPTIM_WRAPPERS', 'optimizer': 'OPTIMIZERS',
    'param_scheduler': 'PARAM_SCHEDULERS',
    'default_hooks': 'HOOKS', 'custom_hooks': 'HOOKS',
    'visualizer': 'VISUALIZERS', 'vis_backends': 'VISBACKENDS',
    'log_processor': 'LOG_PROCESSORS', 'strategy': 'STRATEGIES',
    'model_wrapper_cfg': 'MODEL_WRAPPERS',
    'val_evaluator': 'EVALUATOR', 'test_evaluator': 'EVALUATOR', 'metrics': 'METRICS',
    'schedule': 'STEP_PLANS',
}
# keys a builder consumes before it calls the constructor
_BUILDER_KEYS = {
    'HOOKS': {'priority'},
    'OPTIM_WRAPPERS': {'constructor', 'paramwise_cfg', 'lr_mult'},
    'PARAM_SCHEDULERS': {'convert_to_iter_based'},
}
_SPEC_KEYS = {'type', '_scope_', '_delete_'}
# raw dicts handed to a library as they are (DeepSpeed JSON: its `optimizer`
# and `scheduler` entries have a `type` that is not ours)
_OPAQUE = {'STRATEGIES'}


def _registries() -> Dict[str, Any]:
    import mmengine.runner  # noqa: F401  (registers mmengine's own types: optimizers, hooks, loops)

    import vdot_ext.registry as registry
    return {name: getattr(registry, name) for name in registry.__all__}


def lookup_type(type_name: str, hint: Optional[str] = None) -> Tuple[Any, List[str]]:
    """The object a ``type`` string names, searching the hinted vdot_ext
    registry first and then every other one (each with its mmengine parent,
    so scoped names such as ``'mmengine.IterTimerHook'`` work).

    Returns ``(object or None, registered names of the hinted registry)``.
    """
    registries = _registries()
    order = ([hint] if hint in registries else []) + [n for n in registries if n != hint]
    for name in order:
        try:
            obj = registries[name].get(type_name)
        except RuntimeError as exc:  # mmengine: a dotted name that imports nothing
            if not str(exc).startswith('Failed to get'):
                raise
            obj = None
        if obj is not None:
            return obj, []
    known = []
    if hint in registries:
        registry = registries[hint]
        while registry is not None:
            known += list(registry.module_dict)
            registry = registry.parent
    return None, sorted(set(known))


def _keywords(obj: Any) -> Tuple[List[str], bool]:
    """(keyword names, takes ``**kwargs``) of a class or function."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return [], True
    names = [n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_build_specs(cfg: Any, prefix: str = '', hint: Optional[str] = None,
                      implicit: Iterable[str] = ()) -> List[str]:
    """Problems (one line each, dotted path first) with the ``dict(type=...)``
    build specs inside ``cfg``: a type no vdot_ext registry knows, or a
    keyword its constructor does not take (skipped for constructors with
    ``**kwargs``). ``implicit`` names keywords the caller passes to the
    top-level spec itself (e.g. the stage driver's ``work_dir``)."""
    problems: List[str] = []
    _walk_specs(_plain(cfg), prefix, hint, problems, set(implicit))
    return problems


def _walk_specs(node: Any, path: str, hint: Optional[str], problems: List[str],
                implicit: set) -> None:
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _walk_specs(item, f'{path}.{i}' if path else str(i), hint, problems, set())
        return
    if not isinstance(node, dict):
        return
    type_name = node.get('type')
    if type_name is not None:
        obj, known = (type_name, []) if callable(type_name) else lookup_type(type_name, hint)
        where = f'{path}.type' if path else 'type'
        if obj is None:
            close = difflib.get_close_matches(type_name, known, n=3, cutoff=0.6)
            registry = f'the vdot_ext {hint} registry' if hint else 'any vdot_ext registry'
            problems.append(f'{where}: {type_name!r} is not registered in {registry}'
                            + (f'; did you mean {" or ".join(close)}?' if close else ''))
        else:
            names, var_kw = _keywords(obj)
            if names and not var_kw:
                allowed = set(names) | _SPEC_KEYS | _BUILDER_KEYS.get(hint, set())
                missing = sorted(implicit - allowed)
                if missing:
                    problems.append(f'{where}: {type_name!r} does not take {missing}, which the '
                                    f'stage driver passes (it takes {names})')
                for key in node:
                    if key not in allowed:
                        close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
                        problems.append(
                            f'{path}.{key}: {getattr(obj, "__name__", type_name)} has no keyword {key!r}'
                            + (f'; did you mean {" or ".join(close)}?' if close else '')
                            + f' (valid: {names})')
    if hint in _OPAQUE:
        return
    for key, value in node.items():
        if key in _SPEC_KEYS:
            continue
        child_hint = _REGISTRY_HINTS.get(key, hint)
        _walk_specs(value, f'{path}.{key}' if path else str(key), child_hint, problems, set())


def raise_problems(problems: List[str], filename: str, what: str) -> None:
    if problems:
        raise ConfigCheckError(f'{filename}: {what}:\n' + '\n'.join(f'  {p}' for p in problems))


# ---------------------------------------------------------------------------
# launching several processes
# ---------------------------------------------------------------------------
def launched_world_size(launcher: str) -> int:
    """The number of processes this launch has, from the launcher's environment."""
    for var in ('WORLD_SIZE', 'SLURM_NTASKS' if launcher == 'slurm' else None,
                'OMPI_COMM_WORLD_SIZE' if launcher == 'mpi' else None):
        if var and os.environ.get(var, '').isdigit():
            return int(os.environ[var])
    return 1


def check_distributed_launch(cfg: Any, launcher: str, where: str) -> None:
    """A config without ``strategy`` must run as one process.

    Without ``strategy`` the config runs on mmengine's plain ``Runner``,
    whose distributed wrapper (``MMDistributedDataParallel``) calls the
    model's forward instead of its per-role ``train_step`` (Algorithm 1 with
    one optimizer per role), so a distributed launch would fail deep inside
    mmengine (``AttributeError: ... predict_x0``). Fail at once instead and
    point at the DeepSpeed strategy (docs/DESIGN.md §7).
    """
    world_size = launched_world_size(launcher)
    distributed = (launcher or 'none') != 'none' or world_size > 1
    if not distributed or _plain(cfg).get('strategy'):
        return
    raise ConfigCheckError(
        f'{where}: launched on {world_size} process(es) with --launcher {launcher}, but the config has '
        'no `strategy`. Configs without a strategy run as one process on mmengine\'s plain Runner, '
        'whose DDP wrapper bypasses the model\'s per-role train_step. For several GPUs use '
        "RoleDeepSpeedStrategy: add strategy=dict(type='RoleDeepSpeedStrategy', "
        'config=dict(zero_optimization=dict(stage=2))) to the config (as configs/_base_/deepspeed_zero2.py '
        'and configs/_base_/deepspeed_zero3.py do; the tiny demo on DeepSpeed: configs/deepspeed/), '
        'or run one process with --launcher none.')


def _plain(cfg: Any) -> Any:
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
