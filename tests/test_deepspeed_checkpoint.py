"""Checkpoint folders of RoleDeepSpeedStrategy without a DeepSpeed run (a
stand-in engine writes the role folder): crash-safe publishing, safetensors
for weights, safe loading of every file (including DeepSpeed's own engine
files), errors that name the file."""
import os
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer, MMLogger

from vdot_ext.engine.deepspeed_checkpoint import (
    CHECKPOINT_STATE,
    deepspeed_safe_globals,
    load_rng_state,
    read_checkpoint_state,
    staging_folder,
)
from vdot_ext.engine.deepspeed_strategy import RoleDeepSpeedStrategy
from vdot_ext.utils import UnsafeCheckpointError, set_rng_state


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Linear(3, 2)
        self.loss_head = nn.Linear(2, 1)   # loose state: not a role module
        self.register_buffer('iteration', torch.tensor(7))

    def trainable_roles(self):
        return {'generator': [self.generator]}


class StandInEngine:
    """Writes ``<save_dir>/<tag>/model.pt`` like an engine; ``crash`` raises
    after writing part of it (a kill mid-save)."""

    def __init__(self, module, crash=False):
        self.module, self.crash = module, crash

    def save_checkpoint(self, save_dir, tag, **kwargs):
        os.makedirs(osp.join(save_dir, tag), exist_ok=True)
        torch.save({'w': torch.ones(2)}, osp.join(save_dir, tag, 'model.pt'))
        if self.crash:
            raise KeyboardInterrupt('killed mid-save')


def strategy(crash=False):
    s = RoleDeepSpeedStrategy.__new__(RoleDeepSpeedStrategy)
    s._seed, s.model = 5, TwoPart()
    s.engines = {'generator': StandInEngine(s.model.generator, crash)}
    s.frozen_engines, s.save_lora, s.exclude_frozen_parameters = {}, False, True
    s.logger = MMLogger.get_current_instance()
    return s


def extra():
    hub = {'log_scalars': {'train/loss': HistoryBuffer([1.0, 2.0], [1, 1])}, 'runtime_info': {'iter': 4},
           'resumed_keys': {}}
    return dict(meta=dict(iter=4), message_hub=hub)


def add_ema(checkpoint):   # what a hook's before_save_checkpoint adds
    checkpoint['generator_ema'] = {'weight': torch.full((2, 3), 0.5), 'bias': torch.zeros(2)}


def test_save_publishes_a_complete_folder_and_loads_back(tmp_path):
    target = str(tmp_path / 'iter_4.pth')
    torch.manual_seed(11)
    strategy().save_checkpoint(target, extra_ckpt=extra(), callback=add_ema)
    next_draw = torch.rand(3)
    files = sorted(os.listdir(target))
    assert files == sorted([CHECKPOINT_STATE, 'generator', 'generator_ema.safetensors', 'rng_state_rank0.pth',
                            'state_dict.safetensors'])
    assert not osp.exists(staging_folder(target))
    state = read_checkpoint_state(target)
    # weights are safetensors, put back on load; the model's loose state only
    assert set(state['state_dict']) == {'loss_head.weight', 'loss_head.bias', 'iteration'}
    assert int(state['state_dict']['iteration']) == 7
    assert torch.equal(state['generator_ema']['weight'], torch.full((2, 3), 0.5))
    # the message hub went through plain containers and came back as mmengine expects
    assert isinstance(state['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    assert state['meta']['world_size'] == 1 and state['meta']['iter'] == 4
    # every file loads with weights_only=True (no allow-list beyond utils' own)
    torch.load(osp.join(target, CHECKPOINT_STATE), weights_only=True)
    set_rng_state(load_rng_state(target, 0))   # weights_only-safe, restores the streams
    assert torch.equal(torch.rand(3), next_draw)


def test_a_crash_mid_save_never_leaves_a_half_written_checkpoint(tmp_path):
    target = str(tmp_path / 'iter_8.pth')
    with pytest.raises(KeyboardInterrupt):
        strategy(crash=True).save_checkpoint(target, extra_ckpt=extra())
    assert not osp.exists(target)            # nothing under the checkpoint's name
    assert osp.isdir(staging_folder(target))  # the partial write is hidden
    # an existing checkpoint of that name survives a crashed re-save intact
    strategy().save_checkpoint(target, extra_ckpt=extra())
    before = sorted(os.listdir(target))
    with pytest.raises(KeyboardInterrupt):
        strategy(crash=True).save_checkpoint(target, extra_ckpt=extra(), callback=add_ema)
    assert sorted(os.listdir(target)) == before
    read_checkpoint_state(target)
    # the next good save removes the stale staging folder and replaces the checkpoint
    strategy().save_checkpoint(target, extra_ckpt=extra(), callback=add_ema)
    assert not osp.exists(staging_folder(target))
    assert 'generator_ema' in read_checkpoint_state(target)


def test_load_errors_name_the_file(tmp_path):
    target = str(tmp_path / 'iter_4.pth')
    with pytest.raises(FileNotFoundError, match='iter_4.pth'):
        read_checkpoint_state(target)
    strategy().save_checkpoint(target, extra_ckpt=extra(), callback=add_ema)
    ema = osp.join(target, 'generator_ema.safetensors')
    with open(ema, 'r+b') as f:
        f.truncate(20)
    with pytest.raises(ValueError, match='generator_ema.safetensors'):
        read_checkpoint_state(target)
    os.remove(osp.join(target, 'rng_state_rank0.pth'))
    with pytest.raises(FileNotFoundError, match='rng_state_rank0.pth'):
        load_rng_state(target, 0)


class RunsCode:
    def __reduce__(self):
        return (open, (str(MARKER), 'w'))


MARKER = None


def test_deepspeed_engine_files_load_without_running_code(tmp_path):
    """DeepSpeed's own TorchCheckpointEngine unpickles fully (no weights_only):
    a crafted engine file runs code. The strategy's engine refuses it and still
    loads what DeepSpeed really writes (loss scaler, ZeRO stage enum, fragment
    addresses)."""
    global MARKER
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from vdot_ext.engine.deepspeed_checkpoint import _safe_checkpoint_engine_class
    MARKER = tmp_path / 'code_ran'
    crafted = tmp_path / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'
    torch.save({'optimizer_state_dict': RunsCode()}, crafted)
    safe = _safe_checkpoint_engine_class()()
    with pytest.raises(UnsafeCheckpointError, match='zero_pp_rank_0'):
        safe.load(str(crafted), map_location='cpu')
    assert not MARKER.exists()
    TorchCheckpointEngine().load(str(crafted), map_location='cpu')   # DeepSpeed's default
    assert MARKER.exists()
    real = tmp_path / 'real.pt'
    torch.save(dict(loss_scaler=LossScaler(1.0), zero_stage=ZeroStageEnum.weights,
                    param_slice_mappings=[{'w': fragment_address(numel=4, start=0)}], state=torch.ones(3)), real)
    loaded = safe.load(str(real))
    assert loaded['zero_stage'] == ZeroStageEnum.weights and loaded['param_slice_mappings'][0]['w'].numel == 4
    assert len(deepspeed_safe_globals()) == 4
