"""The bottom layer: atomic writes, loads that never run code, RNG snapshots."""
import os
import random

import numpy as np
import pytest
import torch

from vdot_ext.utils import (
    UnsafeCheckpointError,
    atomic_write,
    get_rng_state,
    load_tensor_file,
    merge_dicts,
    safe_torch_load,
    save_safetensors,
    save_torch,
    set_rng_state,
    stable_hash,
)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('echo ran > /dev/null', ))


def test_safe_load_refuses_a_pickle_that_runs_code(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match='evil.pth.*system'):
        safe_torch_load(str(path), field='load_from')


def test_safe_load_reads_numpy_metadata_and_the_trusted_opt_in_warns(tmp_path, monkeypatch):
    path = tmp_path / 'ok.pth'
    save_torch({'meta': {'x': np.float64(2.0), 'arr': np.arange(3)}, 'w': torch.ones(2)}, str(path))
    loaded = safe_torch_load(str(path))
    assert loaded['meta']['x'] == 2.0 and loaded['meta']['arr'].tolist() == [0, 1, 2]
    evil = tmp_path / 'legacy.pth'
    torch.save({'x': _RunsCode.__name__, 'o': object.__new__(_Legacy)}, evil)
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(str(evil))
    monkeypatch.setenv('VDOT_EXT_TRUST_PICKLE', '1')
    with pytest.warns(UserWarning, match='full unpickling'):
        assert isinstance(safe_torch_load(str(evil))['o'], _Legacy)


class _Legacy:
    pass


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / 'a.json'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), 'w') as f:
            f.write('half')
            raise RuntimeError('killed')
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['a.json']  # no temporary left behind
    with atomic_write(str(path), 'w') as f:
        f.write('new')
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == 'new' and (path.stat().st_mode & 0o777) == 0o666 & ~mask


def test_safetensors_round_trip_with_shared_storage(tmp_path):
    w = torch.arange(4.)
    save_safetensors({'a': w, 'b': w[:2]}, str(tmp_path / 'x.safetensors'), {'step': 3})
    back = load_tensor_file(str(tmp_path / 'x.safetensors'))
    assert back['a'].tolist() == [0, 1, 2, 3] and back['b'].tolist() == [0, 1]


def test_rng_snapshot_restores_every_stream():
    state = get_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_merge_and_hash():
    assert merge_dicts({'a': {'b': 1, 'c': 2}}, {'a': {'b': 3}}) == {'a': {'b': 3, 'c': 2}}
    assert merge_dicts({'a': {'b': 1, 'c': 2}}, {'a': {'b': 3, '_delete_': True}}) == {'a': {'b': 3}}
    assert stable_hash({'b': 1, 'a': [1, 2]}) == stable_hash({'a': [1, 2], 'b': 1})
    assert stable_hash({'a': 1}) != stable_hash({'a': 2})


def test_a_torn_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / 'torn.pth'
    save_torch({'w': torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:200])   # killed mid-write without atomic_write
    with pytest.raises(RuntimeError, match=r'resume: cannot load .*torn\.pth'):
        safe_torch_load(str(path), field='resume')
