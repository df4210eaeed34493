#!/usr/bin/env python
"""Run every GPU check within a time budget and print ONE table (``run_checks.sh`` calls this).

    python benchmarks/gpu/run_checks.py [--dry-run] [--budget 470] [--markdown out.md] [--jsonl out.jsonl]

Checks, each in its own process (``common.py``), in this order:

  1. ``sinkhorn_check.py --setting paper``  Triton / blocked / sdpa / flash-sinkhorn vs float64, 21×1560²×16
  2. ``sinkhorn_check.py --setting large``  the same at 32760², D 64
  3. ``train_step_check.py``                stage-2 train_step, 1.3B, bf16, grad-ckpt, ZeRO-2, vs plan_memory
  4. ``inference_check.py``                 4-step inference at 81×480×832, 1.3B

Each check gets at most its own limit and what is left of ``--budget`` seconds (default 470:
the whole run stays under 8 minutes); a check that runs out is killed and shown as
``timeout``, a check that crashes as ``error`` with its last message, so the table is always
printed. ``--dry-run`` runs every check at tiny size on the CPU (Triton through its
interpreter) and prints the same table. Exit status 0 when no check failed, 1 otherwise.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GIB = 1024**3
CHECKS = [  # (script args, seconds on a GPU, seconds in the dry run)
    (['sinkhorn_check.py', '--setting', 'paper'], 90, 300),
    (['sinkhorn_check.py', '--setting', 'large'], 150, 300),
    (['train_step_check.py'], 240, 400),
    (['inference_check.py'], 120, 300),
]
COLUMNS = ('check', 'setting', 'backend', 'device', 'time', 'peak mem', 'accuracy / estimate', 'status')


def _fmt_bytes(n):
    if n is None:
        return ''
    return f'{n / GIB:.2f} GiB' if n >= 0.1 * GIB else f'{n / 2**20:.1f} MiB'


def _fmt_time(r):
    if r.get('seconds') is None:
        return ''
    text = f"{r['seconds']:.3f} s" if r['seconds'] < 10 else f"{r['seconds']:.1f} s"
    if r.get('check') == 'train_step':
        text += '/step'
    return text


def _accuracy(r):
    if r.get('check') == 'sinkhorn':
        parts = []
        if r.get('grad_rel_err') is not None:
            parts.append(f"grad rel {r['grad_rel_err']:.1e}")
        if r.get('pot_err') is not None:
            parts.append(f"pot {r['pot_err']:.1e}·ε")
        if r.get('col_err') is not None:
            parts.append(f"col err {r['col_err']:.1e}")
        return ', '.join(parts)
    if r.get('check') == 'train_step' and r.get('plan_bytes') is not None:
        return f"plan_memory: {_fmt_bytes(r['plan_bytes'])}"
    if r.get('check') == 'inference' and r.get('total_seconds') is not None:
        return f"end to end {r['total_seconds']:.1f} s"
    return ''


def row_cells(r):
    setting = r.get('setting', '')
    if r.get('shape'):
        setting = f"{setting} {r['shape']}, ε {r.get('eps', '')}"
    return [r.get('check', ''), setting, r.get('backend', ''), r.get('device', ''), _fmt_time(r),
            _fmt_bytes(r.get('peak_bytes')), _accuracy(r), r.get('status', '')]


def render(rows, notes=True) -> str:
    """The one table (markdown pipes, readable as plain text), notes below it."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(COLUMNS))]
    lines = ['| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cell, widths)) + ' |' for cell in cells]
    lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    if notes:
        extra = list(dict.fromkeys(f"- {r['check']} {r.get('backend', '')}: {r['note']}".replace('  ', ' ')
                                   for r in rows if r.get('note')))
        if extra:
            lines += [''] + extra
    return '\n'.join(lines)


def run_check(args, limit, dry, env):
    """The RESULT rows of one check process (an error/timeout row if it gives none)."""
    script = args[0]
    cmd = [sys.executable, os.path.join(HERE, script)] + args[1:] + (['--dry-run'] if dry else [])
    name = script.replace('_check.py', '') + (f' {args[2]}' if len(args) > 2 else '')
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or '')
        rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith('RESULT ')]
        return rows + [dict(check=name, status='timeout', note=f'killed after {limit:.0f} s')]
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ['no output'])[-1]
        rows.append(dict(check=name, status='error', note=f'exit {proc.returncode}: {tail[:200]}'))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry-run', '--cpu', dest='dry_run', action='store_true',
                        help='every check at tiny size on the CPU')
    parser.add_argument('--budget', type=float, default=None,
                        help='seconds for all checks (default 470 on a GPU, 1200 in the dry run)')
    parser.add_argument('--only', nargs='*', default=None, help='run only checks whose script starts so')
    parser.add_argument('--markdown', default=None, help='also write the table (and the device) here')
    parser.add_argument('--jsonl', default=None, help='also write the raw result rows here')
    args = parser.parse_args(argv)
    budget = args.budget or (1200.0 if args.dry_run else 470.0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get('PYTHONPATH', '')]))
    if args.dry_run:
        env['TRITON_INTERPRET'] = '1'   # the Triton kernel through its CPU interpreter
        env.setdefault('CUDA_VISIBLE_DEVICES', '')
    start = time.monotonic()
    rows = []
    for check_args, gpu_limit, dry_limit in CHECKS:
        if args.only is not None and not any(check_args[0].startswith(o) for o in args.only):
            continue
        left = budget - (time.monotonic() - start)
        name = check_args[0].replace('_check.py', '')
        if left < 10:
            rows.append(dict(check=name, status='skipped', note='time budget spent'))
            continue
        limit = min(dry_limit if args.dry_run else gpu_limit, left)
        print(f'[run_checks] {" ".join(check_args)} (limit {limit:.0f} s)', file=sys.stderr, flush=True)
        rows += run_check(check_args, limit, args.dry_run, env)
    elapsed = time.monotonic() - start
    table = render(rows)
    mode = 'dry run (CPU, tiny sizes)' if args.dry_run else 'GPU'
    header = f'GPU checks, {mode}: {len(rows)} rows in {elapsed:.0f} s'
    print(header)
    print(table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(f'{header}\n\n{table}\n')
    if args.jsonl:
        with open(args.jsonl, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    failed = [r for r in rows if r.get('status') in ('FAIL', 'error', 'timeout')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
