"""vdot_ext: VDOT (optimal transport distillation) for Wan2.1 / VACE on mmengine.

The public names below are imported on first use (PEP 562), so that
``import vdot_ext`` (which mmengine does for ``default_scope='vdot_ext'``) does
not pull in diffsynth and DeepSpeed before they are needed.
"""
import importlib

__version__ = '0.1.0'

# public name -> module that defines it
_PUBLIC = {
    'WanVACEScore': 'vdot_ext.models.wan_vace_score',
    'RegisterTokenDiscriminator': 'vdot_ext.models.register_token_discriminator',
    'VACEAccWanInit': 'vdot_ext.models.vace_acc_wan_init',
    'VDOTDistiller': 'vdot_ext.models.vdot_distiller',
    'DMDLoss': 'vdot_ext.losses.dmd_loss',
    'OTDLoss': 'vdot_ext.losses.otd_loss',
    'DenoisingLoss': 'vdot_ext.losses.denoising_loss',
    'RelativisticGANLoss': 'vdot_ext.losses.gan_loss',
    'LogisticGANLoss': 'vdot_ext.losses.logistic_gan_loss',
    'MotionDiscriminator': 'vdot_ext.models.motion_discriminator',
    'RAFTFlow': 'vdot_ext.models.optical_flow',
    'LucasKanadeFlow': 'vdot_ext.models.optical_flow',
}

__all__ = sorted(_PUBLIC) + ['__version__']


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
