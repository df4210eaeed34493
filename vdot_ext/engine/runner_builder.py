"""The runner for a config: mmengine's ``Runner``, or ``FlexibleRunner`` with
``RoleDeepSpeedStrategy`` when the config names a ``strategy`` (docs/DESIGN.md §7)."""
from vdot_ext.registry import STRATEGIES


def build_runner(cfg):
    """``FlexibleRunner`` when the config has a ``strategy`` (DeepSpeed),
    else mmengine's plain ``Runner`` (CPU tests, single device)."""
    if cfg.get('strategy'):
        from mmengine.runner import FlexibleRunner

        import vdot_ext.engine  # noqa: F401  (registers the strategy)
        strategy = cfg.strategy
        if isinstance(strategy.get('type'), str) and '.' not in strategy['type'] \
                and strategy['type'] in STRATEGIES.module_dict:
            # FlexibleRunner builds the strategy before it sets the default
            # scope: name the scope so mmengine's root registry finds it
            strategy['type'] = f'vdot_ext.{strategy["type"]}'
        return FlexibleRunner.from_cfg(cfg)
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg)
