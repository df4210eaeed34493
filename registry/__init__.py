"""mmengine registries of vdot_ext (installed as ``vdot_ext.registry``).

Each registry is a child of mmengine's root registry of the same kind with
scope ``vdot_ext``. ``locations`` lists the modules that register into it; they
are imported lazily the first time a config with ``default_scope='vdot_ext'``
builds something, so ``import vdot_ext.registry`` stays cheap.

Config example::

    default_scope = 'vdot_ext'
    model = dict(type='VDOTDistiller', ...)
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import STRATEGIES as MMENGINE_STRATEGIES
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry

_SCOPE = 'vdot_ext'

# models: score networks, discriminators, initialisers, losses, distillers
MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope=_SCOPE,
    locations=['vdot_ext.models', 'vdot_ext.losses'])
MODEL_WRAPPERS = Registry(
    'model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
DATASETS = Registry(
    'dataset', parent=MMENGINE_DATASETS, scope=_SCOPE,
    locations=['vdot_ext.data', 'vdot_ext.patches'])
DATA_SAMPLERS = Registry(
    'data sampler', parent=MMENGINE_DATA_SAMPLERS, scope=_SCOPE,
    locations=['vdot_ext.data'])
TRANSFORMS = Registry(
    'transform', parent=MMENGINE_TRANSFORMS, scope=_SCOPE,
    locations=['vdot_ext.data', 'vdot_ext.patches'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
LOOPS = Registry(
    'loop', parent=MMENGINE_LOOPS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
OPTIMIZERS = Registry(
    'optimizer', parent=MMENGINE_OPTIMIZERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope=_SCOPE, locations=['vdot_ext.engine'])
PARAM_SCHEDULERS = Registry(
    'parameter scheduler', parent=MMENGINE_PARAM_SCHEDULERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
STRATEGIES = Registry(
    'strategy', parent=MMENGINE_STRATEGIES, scope=_SCOPE,
    locations=['vdot_ext.engine'])
RUNNERS = Registry(
    'runner', parent=MMENGINE_RUNNERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
METRICS = Registry(
    'metric', parent=MMENGINE_METRICS, scope=_SCOPE,
    locations=['vdot_ext.evaluation'])
EVALUATOR = Registry(
    'evaluator', parent=MMENGINE_EVALUATOR, scope=_SCOPE,
    locations=['vdot_ext.evaluation'])
VISBACKENDS = Registry(
    'vis_backend', parent=MMENGINE_VISBACKENDS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
VISUALIZERS = Registry(
    'visualizer', parent=MMENGINE_VISUALIZERS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
LOG_PROCESSORS = Registry(
    'log_processor', parent=MMENGINE_LOG_PROCESSORS, scope=_SCOPE,
    locations=['vdot_ext.engine'])
# training schedules: which role steps with which objective at iteration k
STEP_PLANS = Registry('step plan', scope=_SCOPE,
                      locations=['vdot_ext.models.step_plans', 'vdot_ext.models.mogan_schedules'])
# recipe steps run by the stage driver (e.g. codec preparation, evaluation)
FUNCTIONS = Registry(
    'function', parent=MMENGINE_FUNCTIONS, scope=_SCOPE,
    locations=['vdot_ext.data', 'vdot_ext.engine'])

__all__ = [
    'MODELS', 'MODEL_WRAPPERS', 'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS',
    'HOOKS', 'LOOPS', 'OPTIMIZERS', 'OPTIM_WRAPPERS',
    'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS', 'STRATEGIES', 'RUNNERS',
    'METRICS', 'EVALUATOR', 'VISBACKENDS', 'VISUALIZERS', 'LOG_PROCESSORS',
    'FUNCTIONS', 'STEP_PLANS'
]
