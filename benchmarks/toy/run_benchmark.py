#!/usr/bin/env python
"""Exact-score toy benchmark of DMD, OTD and their parity / balanced weighting (issue 11 §3; docs/DESIGN.md §5).

Mixtures × variants × seeds, each (mixture, variant) job trains its seeds side by side in one process
(``toy_distill.py``); jobs run in ``--workers`` processes with one torch thread each. Writes

* ``<out>/toy_results.json``: every metric history, the mean gradient statistics of each job, timings;
* ``<out>/toy_metrics.png``: coverage, mode-weight error, off-mode share and W2 over training (mean ± std
  over seeds);
* ``--results`` (Markdown): the tables, mean ± std over the seeds at the end of training and the paired
  differences to DMD only.

Examples (the numbers in benchmarks/RESULTS.md, "Exact-score toy"; the first is the ≤ 10-minute default, 2 cores):

    python benchmarks/toy/run_benchmark.py --workers 2 --out work_dirs/toy --results work_dirs/toy/tables.md
    python benchmarks/toy/run_benchmark.py --workers 2 --sets ring8@5:3000 unbalanced3@5:3000 \
        --out work_dirs/toy_shift5 --results work_dirs/toy_shift5/tables.md
    python benchmarks/toy/run_benchmark.py --render work_dirs/toy/toy_results.json --out work_dirs/toy

Every run is deterministic (seeded weights and noise; evaluation re-noises from its own stream).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# MIXTURE@SHIFT[:ITERATIONS]. Uniform score timesteps (shift 1), where DMD's reverse KL can zero-force and training
# gets far enough in the budget to tell the variants apart; the 16-D OT problems need 100-1000 Sinkhorn iterations,
# so that set runs half as long. The recipe's shift 5: ``--sets ring8@5 unbalanced3@5``
# (benchmarks/RESULTS.md, "Exact-score toy").
DEFAULT_SETS = ('ring8@1:6000', 'unbalanced3@1:6000', 'gauss16d@1:3000')
METRICS = ('coverage', 'weight_l1', 'off_mode', 'w2')
LABELS = {'coverage': 'mode coverage ↑', 'weight_l1': 'mode-weight L1 ↓', 'off_mode': 'off-mode share ↓',
          'w2': 'W2 to teacher ↓'}


def _job(args):
    cfg_dict, = args
    import torch
    torch.set_num_threads(1)
    from mixtures import make_mixture
    from toy_distill import ToyConfig, run
    cfg = ToyConfig(**cfg_dict)
    mixture = make_mixture(cfg.mixture)
    reference = mixture.sample(cfg.final_samples, torch.Generator().manual_seed(5))
    result = run(cfg, mixture, reference)
    print(f'[toy] {cfg.mixture:12s} {cfg.variant:18s} wall {result["wall_s"]:6.1f} s  cpu {result["cpu_s"]:6.1f} s',
          flush=True)
    return result


def _floors(mixtures, sizes):
    """W2 between two independent teacher sample sets: the finite-sample floor of the W2 column."""
    import torch
    from mixtures import make_mixture, w2_exact
    out = {}
    for name in mixtures:
        m = make_mixture(name)
        out[name] = {str(n): w2_exact(m.sample(n, torch.Generator().manual_seed(5)),
                                      m.sample(n, torch.Generator().manual_seed(6))) for n in sizes}
    return out


def _mean_std(values):
    if not values:
        return float('nan'), float('nan')
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(result):
    """End-of-training mean ± std over the seeds that did not diverge."""
    last = result['final']
    alive = [s for s in last if not s.get('diverged')]
    row = {key: _mean_std([s[key] for s in alive]) for key in METRICS}
    row['diverged'] = sum(1 for s in last if s.get('diverged'))
    row['seeds'] = len(last)
    stats = result['mean_generator_stats']
    row['share_otd'] = stats.get('gen_x_share_otd')
    row['cos'] = stats.get('gen_x_cos_otd_dmd')
    row['otd_iters'] = stats.get('otd_iters')
    return row


def render_table(results, floors, final_samples):
    lines = ['| mixture | score t shift | generator steps | variant | coverage ↑ | mode-weight L1 ↓ | off-mode ↓ '
             '| W2 ↓ | diverged | OT share of ‖g‖ | cos(g_OT, g_DMD) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for result in results:
        cfg = result['config']
        row = summarise(result)
        cells = [cfg['mixture'], f"{cfg['score_shift']:g}", str(result['history'][-1]['generator_steps']),
                 cfg['variant']]
        for key, digits in (('coverage', 2), ('weight_l1', 3), ('off_mode', 3), ('w2', 3)):
            mean, std = row[key]
            cells.append(f'{mean:.{digits}f} ± {std:.{digits}f}')
        cells.append(f"{row['diverged']}/{row['seeds']}")
        cells.append('' if row['share_otd'] is None else f"{row['share_otd']:.3f}")
        cells.append('' if row['cos'] is None else f"{row['cos']:+.3f}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    floor = ', '.join(f'{name} {vals[str(final_samples)]:.3f}' for name, vals in floors.items())
    lines.append('')
    lines.append(f'W2 floor (two independent sets of {final_samples} teacher samples): {floor}.')
    return '\n'.join(lines)


def render_paired(results, baseline='dmd'):
    """Per seed (same initial weights and noise seed in every variant), variant minus ``baseline`` at the end:
    mean ± std over seeds, and wins (seeds where the variant is better). Divergent seeds are left out."""
    better = {'coverage': 1.0, 'weight_l1': -1.0, 'off_mode': -1.0, 'w2': -1.0}
    base = {(r['config']['mixture'], r['config']['score_shift']): r for r in results
            if r['config']['variant'] == baseline}
    lines = ['| mixture | score t shift | variant | Δ coverage | Δ mode-weight L1 | Δ off-mode | Δ W2 |',
             '|---|---|---|---|---|---|---|']
    for r in results:
        cfg = r['config']
        ref = base.get((cfg['mixture'], cfg['score_shift']))
        if ref is None or cfg['variant'] == baseline:
            continue
        cells = [cfg['mixture'], f"{cfg['score_shift']:g}", cfg['variant']]
        pairs = [(a, b) for a, b in zip(r['final'], ref['final']) if not a.get('diverged') and not b.get('diverged')]
        for key in METRICS:
            diffs = [a[key] - b[key] for a, b in pairs]
            mean, std = _mean_std(diffs)
            wins = sum(1 for d in diffs if better[key] * d > 1e-12)
            cells.append(f'{mean:+.3f} ± {std:.3f} ({wins}/{len(diffs)} better)')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((r['config']['mixture'], r['config']['score_shift']) for r in results))
    fig, axes = plt.subplots(len(METRICS), len(panels), figsize=(4.2 * len(panels), 2.6 * len(METRICS)),
                             squeeze=False)
    colours = {}
    for r in results:
        cfg = r['config']
        col = panels.index((cfg['mixture'], cfg['score_shift']))
        colour = colours.setdefault(cfg['variant'], f'C{len(colours)}')
        steps = [h['generator_steps'] for h in r['history']]
        for row, key in enumerate(METRICS):
            stats = [_mean_std([s[key] for s in h['seeds'] if not s.get('diverged')]) for h in r['history']]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            ax = axes[row][col]
            ax.plot(steps, mean, color=colour, label=cfg['variant'])
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colour, alpha=0.15)
            ax.set_title(f"{cfg['mixture']}, t shift {cfg['score_shift']:g}: {LABELS[key]}", fontsize=9)
            if row == len(METRICS) - 1:
                ax.set_xlabel('generator steps')
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    from toy_distill import VARIANTS, ToyConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sets', nargs='+', default=list(DEFAULT_SETS),
                   help='MIXTURE@SHIFT[:ITERATIONS]: a mixture, the shift of the DMD/OTD/critic timesteps (the '
                        'recipe: 5; 1 = uniform t) and the iterations (default --iterations)')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    defaults = ToyConfig()
    p.add_argument('--iterations', type=int, default=defaults.iterations)
    p.add_argument('--evals', type=int, default=10, help='evaluations over training (the curves)')
    p.add_argument('--batch', type=int, default=defaults.batch)
    p.add_argument('--hidden', type=int, default=defaults.hidden)
    p.add_argument('--lr-generator', type=float, default=defaults.lr_generator)
    p.add_argument('--lr-critic', type=float, default=defaults.lr_critic)
    p.add_argument('--gen-every', type=int, default=defaults.gen_every)
    p.add_argument('--eval-samples', type=int, default=defaults.eval_samples)
    p.add_argument('--final-samples', type=int, default=defaults.final_samples)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join('work_dirs', 'toy'), help='results JSON and plot')
    p.add_argument('--results', default=None, help='write the Markdown tables here')
    p.add_argument('--render', default=None, metavar='JSON',
                   help='only re-render the tables and the plot of a toy_results.json')
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        return report(saved['results'], saved['w2_floor'], saved['results'][0]['config']['final_samples'],
                      saved['timing'], args.out, args.results)
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f'--variants: unknown {name!r}; expected some of {list(VARIANTS)}')

    start_wall = time.perf_counter()
    jobs = []
    sets = []
    for item in args.sets:
        mixture, _, rest = item.partition('@')
        shift, _, iterations = rest.partition(':')
        try:
            sets.append((mixture, float(shift), int(iterations or args.iterations)))
        except ValueError:
            p.error(f'--sets: {item!r} is not MIXTURE@SHIFT[:ITERATIONS] (e.g. ring8@1:6000)')
    for (mixture, shift, iterations), variant in ((s, v) for s in sets for v in args.variants):
        cfg = ToyConfig(mixture=mixture, variant=variant, score_shift=shift, seeds=list(args.seeds),
                        iterations=iterations, eval_every=max(1, iterations // args.evals), batch=args.batch,
                        hidden=args.hidden, lr_generator=args.lr_generator, lr_critic=args.lr_critic,
                        gen_every=args.gen_every, eval_samples=args.eval_samples,
                        final_samples=args.final_samples)
        jobs.append((asdict(cfg), ))
    # longest first (16-D), so the two workers finish together
    jobs.sort(key=lambda j: (j[0]['mixture'] != 'gauss16d', j[0]['variant'] == 'dmd'))   # longest first
    if args.workers == 1:
        results = [_job(job) for job in jobs]
    else:
        with mp.get_context('spawn').Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    order = [(m, s, v) for m, s, _ in sets for v in args.variants]
    results.sort(key=lambda r: order.index((r['config']['mixture'], r['config']['score_shift'],
                                            r['config']['variant'])))
    import torch
    torch.set_num_threads(1)
    floors = _floors(list(dict.fromkeys(m for m, _, _ in sets)), sorted({args.eval_samples, args.final_samples}))
    wall = time.perf_counter() - start_wall
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    timing = dict(wall_s=wall, cpu_s=cpu, workers=args.workers, cpus=os.cpu_count(),
                  load_avg=os.getloadavg(), python=platform.python_version(), torch=torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    from vdot_ext.utils import write_json
    write_json(os.path.join(args.out, 'toy_results.json'), dict(results=results, w2_floor=floors, timing=timing))
    report(results, floors, args.final_samples, timing, args.out, args.results)


def report(results, floors, final_samples, timing, out, results_path=None):
    """Print the tables, write the plot to ``out`` and the tables to ``results_path``."""
    os.makedirs(out, exist_ok=True)
    plot(results, os.path.join(out, 'toy_metrics.png'))
    text = (render_table(results, floors, final_samples) + '\n\nPaired with DMD only (same seed: same initial '
            'weights and noise), variant − DMD at the end:\n\n' + render_paired(results))
    print(text)
    load = ', '.join(f'{x:.1f}' for x in timing['load_avg'])
    print(f"[toy] total wall {timing['wall_s']:.1f} s, CPU {timing['cpu_s']:.1f} s ({timing['workers']} workers, "
          f'load average at the end {load})')
    if results_path:
        from vdot_ext.utils import atomic_write
        with atomic_write(results_path, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
