"""benchmarks/gpu: the checks' table, the Sinkhorn check's comparison with float64, and
(slow) the whole script in its CPU dry mode."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, 'benchmarks', 'gpu')


def _load(name):
    spec = importlib.util.spec_from_file_location(f'gpu_{name}', os.path.join(GPU, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(text):
    return [json.loads(line[7:]) for line in text.splitlines() if line.startswith('RESULT ')]


def test_one_table_with_every_column():
    run = _load('run_checks')
    rows = [dict(check='sinkhorn', setting='paper', shape='21×1560²×16', eps='0.05', backend='triton',
                 device='H200', seconds=0.012, peak_bytes=3 * 2**20, grad_rel_err=2e-6, pot_err=1e-4,
                 col_err=1e-2, status='ok'),
            dict(check='sinkhorn', setting='paper', backend='flash_sinkhorn', status='skipped', note='not installed'),
            dict(check='train_step', setting='1.3B', device='H200', seconds=12.5, peak_bytes=60 * 2**30,
                 plan_bytes=58 * 2**30, status='ok'),
            dict(check='inference', status='timeout', note='killed after 120 s')]
    table = run.render(rows)
    lines = table.splitlines()
    assert lines[0].split('|')[1].strip() == 'check' and len(lines[0].split('|')) == len(run.COLUMNS) + 2
    assert len([ln for ln in lines if ln.startswith('|')]) == 2 + len(rows)      # header, rule, one per row
    assert '0.012 s' in lines[2] and 'grad rel 2.0e-06' in lines[2] and '3.0 MiB' in lines[2]
    assert '12.5 s/step' in table and 'plan_memory: 58.00 GiB' in table and '60.00 GiB' in table
    assert '- sinkhorn flash_sinkhorn: not installed' in table


def test_sinkhorn_check_measures_against_float64():
    check = _load('sinkhorn_check')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check.main(['--setting', 'paper', '--dry-run', '--backends', 'blocked', 'sdpa'])
    rows = _results(out.getvalue())
    assert [r['backend'] for r in rows] == ['blocked', 'sdpa']
    for r in rows:
        assert r['status'] == 'ok' and r['iters'] == 60 and r['grad_rel_err'] < 1e-4, r
        assert r['eps'].startswith('0.05') or 'OTDLoss default' in r['eps']
    # the comparison sees a wrong gradient: 1 % off is a failure
    from vdot_ext.ot import sinkhorn
    a, b, eps, _, _ = check.make_inputs('paper', dry=True)
    ref = sinkhorn(a.double(), b.double(), eps, num_iters=60, return_gradient=True, precision='float64')
    rel, pot = check.compare(ref.f + 3.0, ref.g, ref.gradient * 1.01, ref, eps)
    assert rel == pytest.approx(1e-2, rel=1e-6) and rel > check.GRAD_TOL and pot < 1e-9
    _, pot = check.compare(ref.f + torch.linspace(0, eps, ref.f.shape[-1]), ref.g, None, ref, eps)
    assert pot == pytest.approx(0.5, rel=1e-3)


@pytest.mark.slow
def test_dry_run_prints_one_table_of_every_check(tmp_path):
    """`run_checks.sh --dry-run`: every check at tiny size on the CPU (Triton through its
    interpreter), all passing, one table (about 3 minutes on a loaded 2-core machine)."""
    jsonl = tmp_path / 'rows.jsonl'
    proc = subprocess.run([os.path.join(GPU, 'run_checks.sh'), '--dry-run', '--jsonl', str(jsonl)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    got = {(r['check'], r.get('setting', '').split()[0], r.get('backend', '')): r['status'] for r in rows}
    for setting in ('paper', 'large'):
        for backend in ('triton', 'blocked', 'sdpa'):
            assert got[('sinkhorn', setting, backend)] == 'ok'
        assert got[('sinkhorn', setting, 'flash_sinkhorn')] in ('ok', 'info', 'skipped')
    assert got[('train_step', 'tiny-vace', '')] == 'ok' and got[('inference', 'tiny-vace', '')] == 'ok'
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith('|')]
    assert len(table) == 2 + len(rows) and proc.stdout.count('| check ') == 1
