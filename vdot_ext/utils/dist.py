"""Process-rank helpers: who writes shared files, and unwrapping wrapped models."""
import torch.nn as nn


def is_main_process() -> bool:
    """True on global rank 0, and in a run without ``torch.distributed``.

    Shared files (loss curves, stage markers, final weights, demo outputs) are
    written by this process only; the others read them after a barrier."""
    from mmengine.dist import get_dist_info
    return get_dist_info()[0] == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is up, else nothing."""
    from mmengine.dist import barrier as mm_barrier
    mm_barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / mmengine / DeepSpeed wrappers (``.module`` chains)."""
    seen = set()
    while hasattr(model, 'module') and isinstance(model.module, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        model = model.module
    return model
