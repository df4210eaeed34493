"""Training hooks: loss curves while training runs."""
import os
import os.path as osp
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.hooks import Hook

from vdot_ext.registry import HOOKS
from vdot_ext.utils import atomic_write, is_main_process

from . import checkpointing  # noqa: F401  (registers VDOTCheckpointHook)

CHECKPOINT_KEY = 'loss_curves'


@HOOKS.register_module()
class LossCurveHook(Hook):
    """Records every scalar returned by ``train_step`` at every iteration,
    sends them to mmengine's visualizer (so the configured backends,
    ``LocalVisBackend``'s ``scalars.json``, TensorBoard or W&B, receive them)
    and draws ``loss_curve.png`` in the work dir every ``interval`` iterations
    and at the end.

    The visualizer gets the raw per-iteration values under ``scalar_prefix``
    (default ``'iter/'``): ``LoggerHook`` already sends the same names
    smoothed over ``log_processor.window_size`` every ``interval`` iterations,
    and two series under one name would interleave.

    The plot covers the whole run across resumes: the recorded points travel
    in the checkpoint (``loss_curves``, an ``[N, 2]`` float64 tensor of
    ``(iteration, value)`` per scalar), so a resumed run continues the curve
    exactly from its checkpoint, without a separate data file. Only rank 0
    writes; the PNG is replaced atomically.

    Args:
        interval: plot period in iterations.
        keys: prefixes of the scalars to plot (default: losses, gradient norms
            and OT marginal errors; a surrogate loss such as OTD's has a
            constant value by construction, its gradient norm is the signal).
        scalar_prefix: prefix of the names sent to the visualizer; ``None``
            sends nothing.
    """

    # before the checkpoint hook (VERY_LOW), so that the checkpoint of
    # iteration k holds the point of iteration k
    priority = 'LOW'

    def __init__(self, interval: int = 50, keys: Optional[Sequence[str]] = None,
                 scalar_prefix: Optional[str] = 'iter/'):
        self.interval = interval
        self.keys = tuple(keys) if keys else None
        self.scalar_prefix = scalar_prefix
        self.history: Dict[str, List[List[float]]] = defaultdict(list)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {key: torch.tensor(points, dtype=torch.float64).reshape(-1, 2)
                                      for key, points in self.history.items()}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.history = defaultdict(list)
        for key, points in (checkpoint.get(CHECKPOINT_KEY) or {}).items():
            self.history[key] = [[int(it), float(value)] for it, value in points.cpu().tolist()]

    def before_train(self, runner) -> None:
        # a checkpoint given by load_from starts a new run: its curve is not ours
        if runner.iter == 0:
            self.history = defaultdict(list)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        step = runner.iter + 1
        scalars = {key: float(value) for key, value in (outputs or {}).items()}
        for key, value in scalars.items():
            self.history[key].append([step, value])
        if self.scalar_prefix is not None and scalars:
            runner.visualizer.add_scalars({self.scalar_prefix + k: v for k, v in scalars.items()}, step=step)
        if self.every_n_train_iters(runner, self.interval):
            self.write(runner.work_dir, title=runner.experiment_name)

    def after_train(self, runner):
        self.write(runner.work_dir, title=runner.experiment_name)

    def _plotted(self) -> List[str]:
        if self.keys is None:
            # losses, gradient norms, OT cost and marginal errors, and the
            # generator's per-term shares: the quantities that move
            return sorted(k for k in self.history
                          if 'loss' in k or 'grad_norm' in k or k.endswith('_err')
                          or k.startswith(('otd_w_eps', 'otd_transport_cost', 'gen_x_share', 'gen_x_cos')))
        return sorted(k for k in self.history if k.startswith(self.keys))

    def write(self, out_dir: str, title: str = '') -> None:
        """``loss_curve.png`` in ``out_dir`` (rank 0 only)."""
        if not is_main_process():
            return
        plot_loss_curves({k: self.history[k] for k in self._plotted()},
                         osp.join(out_dir, 'loss_curve.png'), title)


def read_loss_curves(checkpoint: str) -> Dict[str, List[List[float]]]:
    """The ``(iteration, value)`` points a checkpoint's ``LossCurveHook``
    recorded, per scalar: a ``.pth`` file, or a DeepSpeed-strategy checkpoint
    directory. Loaded safely; an error names the file when it has none."""
    state = checkpointing.read_checkpoint(checkpoint)
    if CHECKPOINT_KEY not in state:
        raise KeyError(f'{checkpoint}: no {CHECKPOINT_KEY!r} entry (the run had no LossCurveHook)')
    return {k: [[int(i), float(v)] for i, v in t.tolist()] for k, t in state[CHECKPOINT_KEY].items()}


def plot_loss_curves(series: Dict[str, List[List[float]]], path: str, title: str = '') -> None:
    """One subplot per series (iteration vs value), written atomically to ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series = {name: points for name, points in series.items() if points}
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
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=90, format='png')
    finally:
        plt.close(fig)
