"""LoRA students through peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

``LoRAAdapter`` injects peft LoRA layers into a role's module in place (after
its pretrained weights and initialisers are loaded) and freezes the base
weights. A LoRA linear layer computes (docs/DESIGN.md §7)::

    y = W x + b + s · B A dropout(x)      A ∈ R^{r×in}, B ∈ R^{out×r}
    s = α / r   (rsLoRA: α / √r)

With peft's default initialisation B₀ = 0, so at injection the module's
function is unchanged. Defaults follow DiffSynth-Studio's Wan LoRA training
(``lora_target_modules="q,k,v,o,ffn.0,ffn.2"``, ``lora_alpha = lora_rank``).
Merging gives the full weight ``W' = W + s · B A`` (:func:`merge_lora_state_dict`;
the CLI is ``vdot_ext/tools/merge_lora.py``).

Files (docs/DESIGN.md §8). An adapter is saved as peft's ``save_pretrained``
writes it, so ``PeftModel.from_pretrained(base, folder)`` and
``set_peft_model_state_dict`` load it:

* ``adapter_model.safetensors``: peft's standard keys, from
  ``get_peft_model_state_dict``: ``base_model.model.<layer>.lora_A.weight`` /
  ``.lora_B.weight`` (no adapter name such as ``.default.``);
* ``adapter_config.json``: the ``LoraConfig`` (r, lora_alpha, target_modules,
  init_lora_weights, ...);
* ``lora_diffsynth.safetensors`` (Wan score networks only): the same adapters
  in the Wan/VACE release key layout (``blocks.0.self_attn.q.lora_A.weight``,
  ``vace_blocks.0...``) with ``s`` folded into ``lora_B``, which
  diffsynth's LoRA loader (``pipe.load_lora(pipe.dit, path)``, and
  ``pipe.vace``) applies with its default ``alpha=1``.

Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA:
``W_res = W − s·B₀A₀``; LoftQ: a quantised W) are refused: a checkpoint stores
only the adapters, and ``W + s·B A`` on the released base would be off by
``s·B₀A₀``.
"""
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS
from vdot_ext.utils import load_tensor_file, safe_torch_load, save_safetensors, write_json
from vdot_ext.utils.zero import gathered_state_dict

DEFAULT_TARGETS = ('q', 'k', 'v', 'o', 'ffn.0', 'ffn.2')
ADAPTER = 'default'
LORA_MARK = '.lora_'
BASE_MARK = '.base_layer.'
PEFT_PREFIX = 'base_model.model.'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'
DIFFSYNTH_WEIGHTS = 'lora_diffsynth.safetensors'
# WanVACEScore's children map onto the Wan/VACE release layout by dropping these
WAN_RELEASE_PREFIXES = ('dit.', 'vace.')

# peft `init_lora_weights` values that leave the base weight W untouched (B₀A₀ = 0,
# or data-driven A with B₀ = 0): W + s·B A is then the adapted layer on the released base
MERGEABLE_INITS = (True, False, 'gaussian', 'orthogonal', 'eva')
# ... and those LoRAAdapter can run (eva needs a data pass through peft's
# initialize_lora_eva_weights, which training does not do)
TRAINABLE_INITS = (True, False, 'gaussian', 'orthogonal')
# peft inits known to replace W by W_res = W − s·B₀A₀ (or a quantised W)
BASE_REWRITING_INITS = ('pissa', 'olora', 'corda', 'loftq', 'lora_ga')


@dataclass
class LoRAReport:
    """What ``LoRAAdapter`` did: adapted layer names, trainable (LoRA) and
    frozen (base) parameter counts."""
    layers: List[str]
    trainable: int
    frozen: int


@dataclass
class LoRAFile:
    """An adapter read from disk: canonical keys (``<layer>.lora_A.weight``),
    its peft-style config (``r``, ``lora_alpha``, ...) and where it came from."""
    state: Dict[str, torch.Tensor]
    config: dict
    source: str


def has_lora(module: nn.Module) -> bool:
    return getattr(module, '_vdot_lora_config', None) is not None


def is_lora_key(key: str) -> bool:
    return LORA_MARK in key


def _init_name(value) -> str:
    return repr(value) if isinstance(value, str) else repr(bool(value))


def _rewrites_base(value) -> bool:
    return isinstance(value, str) and value.lower().startswith(BASE_REWRITING_INITS)


def _check_init(value, allowed: Sequence, where: str) -> None:
    if any(value is a or (isinstance(a, str) and isinstance(value, str) and value.lower() == a)
           for a in allowed):
        return
    if _rewrites_base(value):
        why = (f'init_lora_weights={value!r} rewrites the base weights (W_res = W − s·B₀A₀, or a quantised W '
               'for LoftQ); the adapters alone, merged onto the released base, would be off by s·B₀A₀')
    else:
        why = f'init_lora_weights={value!r} is not supported'
    raise ValueError(f'{where}: {why}. Supported: {", ".join(_init_name(a) for a in allowed)}. For a peft '
                     'adapter trained that way, convert it to a plain LoRA first (peft: save_pretrained(..., '
                     'path_initial_model_for_weight_conversion=...)) (docs/DESIGN.md §7).')


@MODELS.register_module()
class LoRAAdapter:
    """Inject LoRA into a module (peft ``inject_adapter_in_model``).

    Args:
        rank: r.
        alpha: α (default r, so the scale α/r is 1 as in DiffSynth).
        dropout: dropout on the LoRA branch input.
        target_modules: module-name suffixes to adapt (peft matching: a name
            equal to the target or ending in ``'.' + target``).
        exclude_modules: names/suffixes never adapted.
        init_lora_weights: peft's init of A, B: True (Kaiming A, zero B),
            'gaussian', 'orthogonal' or False. Inits that rewrite the base
            weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA) are refused.
    """

    def __init__(self,
                 rank: int = 32,
                 alpha: Optional[float] = None,
                 dropout: float = 0.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS,
                 exclude_modules: Optional[Sequence[str]] = None,
                 init_lora_weights=True):
        if int(rank) <= 0:
            raise ValueError(f'LoRAAdapter.rank must be > 0, got {rank}')
        if not target_modules:
            raise ValueError('LoRAAdapter.target_modules is empty')
        _check_init(init_lora_weights, TRAINABLE_INITS, 'LoRAAdapter.init_lora_weights')
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = float(dropout)
        self.target_modules = [str(t) for t in target_modules]
        self.exclude_modules = list(exclude_modules) if exclude_modules else None
        self.init_lora_weights = init_lora_weights

    def config(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                    target_modules=list(self.target_modules),
                    exclude_modules=self.exclude_modules, init_lora_weights=self.init_lora_weights)

    def lora_config(self):
        from peft import LoraConfig
        kwargs = dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                      target_modules=self.target_modules,
                      init_lora_weights=self.init_lora_weights, bias='none')
        if self.exclude_modules:
            kwargs['exclude_modules'] = self.exclude_modules
        return LoraConfig(**kwargs)

    def __call__(self, module: nn.Module) -> LoRAReport:
        from peft import inject_adapter_in_model
        if has_lora(module):
            raise ValueError(f'LoRAAdapter: {type(module).__name__} already has LoRA layers')
        linear_names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        matched = [n for n in linear_names if any(n == t or n.endswith('.' + t)
                                                   for t in self.target_modules)]
        if not matched:
            raise ValueError(
                f'LoRAAdapter: no nn.Linear of {type(module).__name__} matches '
                f'target_modules={self.target_modules} (linear layers are e.g. '
                f'{linear_names[:6]})')
        # peft stores the config on the module (module.peft_config[ADAPTER])
        inject_adapter_in_model(self.lora_config(), module, adapter_name=ADAPTER)
        trainable = frozen = 0
        for name, param in module.named_parameters():
            is_lora = is_lora_key(name)
            param.requires_grad_(is_lora)
            if is_lora:
                trainable += param.numel()
            else:
                frozen += param.numel()
        module._vdot_lora_config = self.config()
        layers = sorted({n.rsplit(BASE_MARK, 1)[0] for n, _ in module.named_parameters()
                         if BASE_MARK in n})
        return LoRAReport(layers=layers, trainable=trainable, frozen=frozen)


def lora_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_lora_key(n)]


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """``module.requires_grad_(flag)`` that keeps LoRA base weights frozen.

    The distiller switches whole roles on and off every step; for a LoRA role
    only the adapters may ever require gradients (a full 14B gradient would
    otherwise be computed and never used)."""
    if not has_lora(module):
        module.requires_grad_(flag)
        return
    for name, param in module.named_parameters():
        param.requires_grad_(flag and is_lora_key(name))


# ----------------------------------------------------------------------
# keys and configs
# ----------------------------------------------------------------------
def canonical_lora_key(key: str) -> str:
    """``<layer>.lora_A.weight`` from peft's file key (``base_model.model.``
    prefix) or a live key with the adapter name (``.lora_A.default.weight``)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    parts = key.split('.')
    for i, part in enumerate(parts):
        if part in ('lora_A', 'lora_B') and len(parts) == i + 3:
            del parts[i + 1]   # the adapter name
            break
    return '.'.join(parts)


def peft_config_dict(module: nn.Module) -> dict:
    """The module's ``LoraConfig`` as the JSON dict peft's ``save_pretrained`` writes."""
    config = module.peft_config[ADAPTER]
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[key] = value.value if hasattr(value, 'value') and type(value).__module__.startswith('peft') else value
    return out


def _as_peft_config(config: dict, source: str) -> dict:
    """peft-style config (``r``, ``lora_alpha``) from peft's JSON or the
    ``{rank, alpha}`` dict of older vdot_ext LoRA files."""
    config = dict(config)
    if 'r' not in config and 'rank' in config:
        config['r'] = config.pop('rank')
        config['lora_alpha'] = config.pop('alpha', config['r'])
    for field in ('r', 'lora_alpha'):
        if config.get(field) is None:
            raise ValueError(f'{source}: LoRA config has no {field!r} (keys: {sorted(config)})')
    return config


def lora_scale(config: dict) -> float:
    """s = α / r (rsLoRA: α / √r) of a LoRA config (peft's or ``{rank, alpha}``)."""
    config = _as_peft_config(config, 'LoRA config')
    r, alpha = float(config['r']), float(config['lora_alpha'])
    return alpha / r ** 0.5 if config.get('use_rslora') else alpha / r


def check_mergeable(config: dict, source: str) -> None:
    """Refuse adapters for which ``W + s·B A`` on the base is not the adapted
    layer: base-rewriting inits, DoRA, per-layer rank/alpha patterns, trained
    biases or full modules saved beside the adapters."""
    config = _as_peft_config(config, source)
    _check_init(config.get('init_lora_weights', True), MERGEABLE_INITS,
                f'{source}: adapter config')
    unsupported = []
    if config.get('use_dora'):
        unsupported.append('use_dora=True (DoRA rescales the merged weight column-wise)')
    if config.get('rank_pattern') or config.get('alpha_pattern'):
        unsupported.append('rank_pattern/alpha_pattern (per-layer scales)')
    if config.get('lora_bias') or config.get('bias', 'none') not in ('none', None):
        unsupported.append(f'bias={config.get("bias")!r}/lora_bias={config.get("lora_bias")!r} (trained biases)')
    if config.get('modules_to_save'):
        unsupported.append(f'modules_to_save={config["modules_to_save"]} (full modules beside the adapters)')
    if config.get('fan_in_fan_out'):
        unsupported.append('fan_in_fan_out=True (Conv1D layers)')
    if unsupported:
        raise ValueError(f'{source}: cannot merge this adapter: {"; ".join(unsupported)}')


# ----------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------
def lora_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA weights of ``module`` with peft's standard keys
    (``<layer>.lora_A.weight``, no adapter name; ``get_peft_model_state_dict``),
    ZeRO-3 shards gathered, CPU tensors. Every rank must call it."""
    from peft import get_peft_model_state_dict
    live = gathered_state_dict(module, include=lambda name, _: is_lora_key(name))
    return get_peft_model_state_dict(module, state_dict=live, adapter_name=ADAPTER,
                                     save_embedding_layers=False)


def load_lora_state_dict(module: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load peft-standard LoRA weights into a LoRA-adapted ``module``
    (``set_peft_model_state_dict``); every adapter key must be present."""
    from peft import set_peft_model_state_dict
    if not has_lora(module):
        raise ValueError(f'{source}: {type(module).__name__} has no LoRA layers to load into')
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if is_lora_key(k)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise KeyError(f'{source}: LoRA keys missing {missing[:5]} ({len(missing)} in all), unexpected '
                       f'{unexpected[:5]} ({len(unexpected)} in all)')


def _lora_layers(lora_sd: Dict[str, torch.Tensor], source: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{layer: {'A': tensor, 'B': tensor}}`` from LoRA keys (any of the accepted styles)."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in lora_sd.items():
        canonical = canonical_lora_key(key)
        if not is_lora_key(canonical):
            raise KeyError(f'{source}: {key!r} is not a LoRA key (expected "<layer>.lora_A.weight" or '
                           '"<layer>.lora_B.weight")')
        layer, rest = canonical.split(LORA_MARK, 1)
        if rest not in ('A.weight', 'B.weight'):
            raise KeyError(f'{source}: {key!r}: unsupported LoRA parameter (only linear lora_A/lora_B)')
        layers.setdefault(layer, {})[rest[0]] = value
    for layer, parts in layers.items():
        if set(parts) != {'A', 'B'}:
            raise KeyError(f'{source}: LoRA layer {layer!r} lacks lora_{({"A", "B"} - set(parts)).pop()}')
    return layers


def merge_lora_state_dict(base_sd: Dict[str, torch.Tensor],
                          lora_sd: Dict[str, torch.Tensor],
                          scale: float,
                          source: str = 'base weights') -> Dict[str, torch.Tensor]:
    """Full weights ``W' = W + s · B A`` in the original key layout.

    ``base_sd`` may be un-adapted (``q.weight``) or peft-adapted
    (``q.base_layer.weight``, LoRA keys are then dropped); the result has the
    un-adapted names. Computed in float32, returned in the base dtype.
    """
    base = {}
    for key, value in base_sd.items():
        if is_lora_key(key):
            continue
        base[key.replace(BASE_MARK, '.')] = value
    merged = dict(base)
    for layer, parts in _lora_layers(lora_sd, 'LoRA weights').items():
        key = f'{layer}.weight'
        if key not in base:
            raise KeyError(f'{source} have no {key!r} for the LoRA layer {layer!r} '
                           f'(e.g. base keys {sorted(base)[:4]})')
        w = base[key]
        delta = parts['B'].float() @ parts['A'].float()
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(f'LoRA layer {layer!r}: B·A is {tuple(delta.shape)} but '
                             f'{source} {key!r} is {tuple(w.shape)}')
        merged[key] = (w.float() + scale * delta).to(w.dtype)
    return merged


def merged_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The live module's weights with its LoRA merged (ZeRO-3 gathered), in
    the un-adapted key layout. Every rank must call it."""
    state = gathered_state_dict(module)
    if not has_lora(module):
        return state
    lora = {k: v for k, v in state.items() if is_lora_key(k)}
    return merge_lora_state_dict(state, lora, lora_scale(peft_config_dict(module)))


# ----------------------------------------------------------------------
# files
# ----------------------------------------------------------------------
def diffsynth_lora_state_dict(state: Dict[str, torch.Tensor], scale: float) -> Optional[Dict[str, torch.Tensor]]:
    """Canonical LoRA keys of a ``WanVACEScore`` (``dit.*``/``vace.*``) in the
    Wan/VACE release layout with ``s`` folded into ``lora_B`` (diffsynth applies
    ``B A`` with its default ``alpha=1``); None for other modules."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in WAN_RELEASE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        value = value.float() * scale if '.lora_B.' in key else value
        out[key[len(prefix):]] = value
    return out


def save_lora_adapter(folder: str, state: Dict[str, torch.Tensor], config: dict,
                      metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Write an adapter in peft's ``save_pretrained`` layout (module docstring)
    under ``folder``; each file atomically. ``state`` has canonical keys,
    ``config`` is peft's config dict. Returns the files written."""
    check_mergeable(config, f'save_lora_adapter({folder})')
    os.makedirs(folder, exist_ok=True)
    meta = dict(metadata or {}, format='pt')
    weights = osp.join(folder, ADAPTER_WEIGHTS)
    save_safetensors({PEFT_PREFIX + canonical_lora_key(k): v for k, v in state.items()}, weights, meta)
    written = [weights]
    scale = lora_scale(config)
    release = diffsynth_lora_state_dict({canonical_lora_key(k): v for k, v in state.items()}, scale)
    if release is not None:
        path = osp.join(folder, DIFFSYNTH_WEIGHTS)
        save_safetensors(release, path, dict(meta, lora_scale_folded_into_lora_B=f'{scale:.17g}'))
        written.append(path)
    config_path = osp.join(folder, ADAPTER_CONFIG)
    write_json(config_path, config, sort_keys=True)   # last: a folder with a config is complete
    written.append(config_path)
    return written


def read_lora_adapter(path: str, prefix: str = '', field: str = '--lora',
                      default_config: Optional[dict] = None) -> LoRAFile:
    """An adapter from: a peft folder (``adapter_config.json`` +
    ``adapter_model.safetensors``/``.bin``), an ``adapter_model.safetensors``
    beside its config, a ``lora_<module>.pth`` of older vdot_ext versions
    (``state_dict`` + ``lora_config``), or an mmengine checkpoint whose LoRA
    keys start with ``prefix``; ``default_config`` (``r``, ``lora_alpha``)
    serves files without a config. Loading never unpickles code."""
    path = os.fspath(path)
    if osp.isdir(path):
        folder, weights = path, None
        for name in (ADAPTER_WEIGHTS, 'adapter_model.bin'):
            if osp.isfile(osp.join(path, name)):
                weights = osp.join(path, name)
                break
        if weights is None:
            raise FileNotFoundError(f'{field}: folder {path} has no {ADAPTER_WEIGHTS}')
    elif osp.isfile(path):
        folder, weights = osp.dirname(path), path
    else:
        raise FileNotFoundError(f'{field}: {path!r} does not exist')
    config = None
    config_path = osp.join(folder, ADAPTER_CONFIG)
    if weights.endswith(('.safetensors', '.bin')) and osp.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f'{field}: cannot read {config_path}: {exc}') from exc
    if weights.endswith('.safetensors'):
        raw = load_tensor_file(weights, field=field)
    else:
        obj = safe_torch_load(weights, field=field)
        if not isinstance(obj, dict):
            raise ValueError(f'{field}: {weights} holds a {type(obj).__name__}, expected a dict')
        if config is None and isinstance(obj.get('lora_config'), dict):
            config = obj['lora_config']
        raw = obj['state_dict'] if isinstance(obj.get('state_dict'), dict) else obj
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if key.startswith(prefix) and is_lora_key(key):
            state[canonical_lora_key(key[len(prefix):])] = value
    if not state:
        raise ValueError(f'{field}: {weights} has no LoRA keys (".lora_A."/".lora_B.") under prefix {prefix!r}')
    config = config if config is not None else default_config
    if config is None:
        raise ValueError(f'{field}: no LoRA config for {weights} (expected {config_path}); give --rank and --alpha')
    return LoRAFile(state=state, config=_as_peft_config(config, f'{field}: {weights}'), source=weights)
