"""Checks that run on a config before anything is built."""
from typing import Any, List, Tuple

REQUIRED = '???'


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


def check_required_fields(cfg: Any, filename: str = 'config') -> None:
    """Raise one error listing every unset required field of ``cfg``."""
    missing = find_required_fields(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
    if missing:
        lines = '\n'.join(f'  {path}: {what}' for path, what in missing)
        raise ValueError(
            f'{filename}: required field(s) not set:\n{lines}\n'
            'set them in the config or with --cfg-options KEY=VALUE')
