"""Training hooks: loss curves on disk while training runs."""
import json
import os
import os.path as osp
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from mmengine.hooks import Hook

from vdot_ext.registry import HOOKS


@HOOKS.register_module()
class LossCurveHook(Hook):
    """Records every scalar returned by ``train_step`` and writes
    ``losses.json`` and ``loss_curve.png`` in the work dir every ``interval``
    iterations and at the end, so a crash loses at most ``interval`` points.

    Args:
        interval: write period in iterations.
        keys: prefixes of the scalars to plot (default: losses, gradient norms
            and OT marginal errors; a surrogate loss such as OTD's has a
            constant value by construction, its gradient norm is the signal).
    """

    priority = 'VERY_LOW'

    def __init__(self, interval: int = 50, keys: Optional[Sequence[str]] = None):
        self.interval = interval
        self.keys = tuple(keys) if keys else None
        self.history: Dict[str, List[List[float]]] = defaultdict(list)

    def before_train(self, runner):
        # a resumed run continues the curves it had written up to its checkpoint
        path = osp.join(runner.work_dir, 'losses.json')
        if runner.iter > 0 and osp.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            for key, points in saved.items():
                self.history[key] = [p for p in points if p[0] <= runner.iter]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for key, value in (outputs or {}).items():
            self.history[key].append([runner.iter + 1, float(value)])
        if self.every_n_train_iters(runner, self.interval):
            self.write(runner.work_dir, title=runner.experiment_name)

    def after_train(self, runner):
        self.write(runner.work_dir, title=runner.experiment_name)

    def _plotted(self) -> List[str]:
        if self.keys is None:
            return sorted(k for k in self.history
                          if 'loss' in k or k.endswith(('grad_norm', '_err')))
        return sorted(k for k in self.history if k.startswith(self.keys))

    def write(self, out_dir: str, title: str = '') -> None:
        os.makedirs(out_dir, exist_ok=True)
        tmp = osp.join(out_dir, 'losses.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(self.history, f)
        os.replace(tmp, osp.join(out_dir, 'losses.json'))
        plot_loss_curves({k: self.history[k] for k in self._plotted()},
                         osp.join(out_dir, 'loss_curve.png'), title)


def plot_loss_curves(series: Dict[str, List[List[float]]], path: str, title: str = '') -> None:
    """One subplot per series (iteration vs value), written to ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    if not series:
        return
    n = len(series)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, series.items()):
        its, vals = zip(*points)
        ax.plot(its, vals, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('iteration', fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
