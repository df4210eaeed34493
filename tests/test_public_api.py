"""The public names import from ``vdot_ext`` and build from ``dict(type=...)``."""
import torch

import vdot_ext
from vdot_ext.registry import MODELS

TINY_SCORE = dict(type='WanVACEScore', preset='tiny-vace')


def test_public_imports_are_the_registered_classes():
    for name in ('OTDLoss', 'DMDLoss', 'RelativisticGANLoss', 'RegisterTokenDiscriminator',
                 'VACEAccWanInit', 'VDOTDistiller', 'WanVACEScore', 'DenoisingLoss'):
        cls = getattr(vdot_ext, name)
        assert MODELS.get(name) is cls, name


def test_each_component_builds_from_a_config_dict(tmp_path):
    built = {
        'OTDLoss': MODELS.build(dict(type='OTDLoss')),
        'DMDLoss': MODELS.build(dict(type='DMDLoss')),
        'RelativisticGANLoss': MODELS.build(dict(type='RelativisticGANLoss')),
        'WanVACEScore': MODELS.build(TINY_SCORE),
        'RegisterTokenDiscriminator': MODELS.build(dict(
            type='RegisterTokenDiscriminator', model_dim=48, model_depth=4, taps=(1, 3),
            bottleneck_dim=24, num_heads=2)),
        'VDOTDistiller': MODELS.build(dict(type='VDOTDistiller', real_score=TINY_SCORE)),
    }
    for name, obj in built.items():
        assert type(obj).__name__ == name
    source = MODELS.build(dict(type='WanVACEScore', preset='tiny'))
    ckpt = tmp_path / 'few_step.pth'
    torch.save({'state_dict': {f'generator.{k}': v for k, v in source.state_dict().items()}},
               ckpt)
    init = MODELS.build(dict(type='VACEAccWanInit', source=str(ckpt)))
    assert type(init).__name__ == 'VACEAccWanInit'


def test_default_scope_config_builds_through_mmengine_root_registry():
    """A config with default_scope='vdot_ext' finds our classes from mmengine's
    root registry (what the Runner does)."""
    from mmengine.registry import MODELS as ROOT_MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('vdot_ext'):
        loss = ROOT_MODELS.build(dict(type='DMDLoss'))
    assert type(loss) is vdot_ext.DMDLoss
