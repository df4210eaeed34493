"""docs/DESIGN.md §2: imports run utils <- models <- engine, never upwards.

Two checks: a static one (every import statement of vdot_ext/models and
vdot_ext/utils, including imports inside functions) and a live one (a fresh
interpreter imports every models module and runs the LoRA helpers that used to
reach into the engine, then lists what got imported)."""
import ast
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = osp.join(ROOT, 'vdot_ext')


def imported_modules(path: str, package: str):
    """(line, absolute module name) of every import in ``path``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ''
            yield node.lineno, name
            for alias in node.names:   # `from vdot_ext import engine`
                yield node.lineno, f'{name}.{alias.name}'


@pytest.mark.parametrize('layer, forbidden', [
    ('models', ('vdot_ext.engine',)),
    ('utils', ('vdot_ext.engine', 'vdot_ext.models', 'vdot_ext.patches')),
])
def test_no_import_runs_upwards(layer, forbidden):
    bad = []
    for folder, _, names in os.walk(osp.join(PACKAGE, layer)):
        for name in names:
            if not name.endswith('.py'):
                continue
            path = osp.join(folder, name)
            module = osp.relpath(path, ROOT)[:-3].replace(os.sep, '.')
            package = module if name == '__init__.py' else module.rsplit('.', 1)[0]
            for line, target in imported_modules(path, package.removesuffix('.__init__')):
                if target.startswith(forbidden):
                    bad.append(f'{osp.relpath(path, ROOT)}:{line} imports {target}')
    assert not bad, '\n'.join(bad)


LIVE = r'''
import importlib, pkgutil, sys
import torch
import vdot_ext.models as models
for info in pkgutil.walk_packages(models.__path__, 'vdot_ext.models.'):
    importlib.import_module(info.name)
from vdot_ext.models.lora import LoRAAdapter, lora_state_dict, merged_state_dict
from vdot_ext.models.wan_vace_score import WanVACEScore
module = WanVACEScore('tiny')
LoRAAdapter(rank=2)(module)
lora_state_dict(module)
merged_state_dict(module)
print(sorted(m for m in sys.modules if m.startswith('vdot_ext.engine')))
'''


def test_models_run_without_the_engine():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', LIVE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == '[]', proc.stdout[-2000:]
