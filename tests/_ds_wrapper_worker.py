"""Worker for tests/test_deepspeed_optim_wrapper.py: drives
``DeepSpeedRoleOptimWrapper`` directly over a tiny module under DeepSpeed
ZeRO-2/3 on CPU (gloo), as the guarded step of the models does, and writes
what it measured as JSON.

    python tests/_ds_wrapper_worker.py OUT.json [bf16]          # one process
    torchrun --nproc_per_node=2 tests/_ds_wrapper_worker.py OUT.json [bf16]
"""
import json
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BF16 = len(sys.argv) > 2 and sys.argv[2] == 'bf16'   # bf16 weights (DeepSpeed's bf16 optimizer path)


def _init():
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1').items():
        os.environ.setdefault(key, value)
    if 'MASTER_PORT' not in os.environ:
        from vdot_ext.engine.deepspeed_strategy import free_port
        os.environ['MASTER_PORT'] = str(free_port())
    import deepspeed
    deepspeed.init_distributed(dist_backend='gloo')
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])


class Toy(nn.Module):
    """A one-role model with a LayerNorm (for paramwise_cfg) and trainable_roles()."""

    def __init__(self):
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))

    def forward(self, x):
        return self.gen(x)

    def trainable_roles(self):
        return {'gen': [self.gen]}

    def role_param_groups(self, role):
        return [dict(name='gen', params=list(self.gen.parameters()))]


def make(stage, gas=1, paramwise_cfg=None, lr=1e-2):
    import deepspeed

    from vdot_ext.engine.deepspeed_optim_wrapper import DeepSpeedRoleOptimWrapper
    from vdot_ext.engine.optim import RoleOptimWrapperConstructor
    torch.manual_seed(0)
    model = Toy()
    built = RoleOptimWrapperConstructor(dict(gen=dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=lr, weight_decay=0.01))),
        paramwise_cfg=paramwise_cfg)(model)
    optimizer = built['gen'].optimizer
    cfg = dict(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas, gradient_clipping=1.0,
               zero_optimization=dict(stage=stage), zero_allow_untested_optimizer=True, steps_per_print=10**9)
    if BF16:
        cfg['bf16'] = dict(enabled=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
    return model, DeepSpeedRoleOptimWrapper(engine, optimizer, 'gen')


def batch(k, rank, bad=False):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * k + rank))
    if bad:
        x[0, 0] = float('nan')
    return x.bfloat16() if BF16 else x


def weights(model):
    from vdot_ext.utils.zero import gathered_state_dict
    return gathered_state_dict(model)


def max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def guarded(model, wrapper, x, finite_decision=True):
    """The guard's sequence: backward, grads_finite, then step+zero_grad or zero_grad."""
    with wrapper.optim_context(model):
        loss = model(x).square().mean()
    wrapper.backward(loss)
    finite = wrapper.grads_finite()
    if finite and finite_decision:
        wrapper.step()
        wrapper.zero_grad()
    else:
        wrapper.zero_grad()
    return finite


def counters(wrapper):
    e = wrapper.engine
    return dict(skipped=e.skipped_steps, global_steps=e.global_steps, micro_steps=e.micro_steps)


def scenarios(stage, rank, world):
    out = {}
    # 1. a NaN batch (on the last rank only) between two good ones
    model, wrapper = make(stage)
    finite = [guarded(model, wrapper, batch(0, rank))]
    first = weights(model)
    finite.append(guarded(model, wrapper, batch(1, rank, bad=rank == world - 1)))
    after_skip = weights(model)
    finite.append(guarded(model, wrapper, batch(2, rank)))
    skipped_run = weights(model)
    ref_model, ref = make(stage)
    guarded(ref_model, ref, batch(0, rank))
    guarded(ref_model, ref, batch(2, rank))
    out['nan'] = dict(finite=finite, skip_changed=max_diff(first, after_skip),
                      all_finite=all(bool(torch.isfinite(v).all()) for v in skipped_run.values()),
                      vs_reference=max_diff(skipped_run, weights(ref_model)), **counters(wrapper))

    # 2. finite gradients, but the guard skips (e.g. a non-finite loss term without gradient)
    model, wrapper = make(stage)
    guarded(model, wrapper, batch(0, rank))
    first = weights(model)
    guarded(model, wrapper, batch(1, rank), finite_decision=False)
    after_skip = weights(model)
    guarded(model, wrapper, batch(2, rank))
    out['forced'] = dict(skip_changed=max_diff(first, after_skip),
                         vs_reference=max_diff(weights(model), weights(ref_model)), **counters(wrapper))

    # 3. gradient accumulation 2: a NaN micro-batch discards its whole window
    model, wrapper = make(stage, gas=2)
    start = weights(model)
    finite = [guarded(model, wrapper, batch(k, rank, bad=k == 0)) for k in (0, 1)]
    after_window = weights(model)
    finite += [guarded(model, wrapper, batch(k, rank)) for k in (2, 3)]
    ref_model, ref = make(stage, gas=2)
    for k in (2, 3):
        guarded(ref_model, ref, batch(k, rank))
    out['gas2'] = dict(finite=finite, skip_changed=max_diff(start, after_window),
                       vs_reference=max_diff(weights(model), weights(ref_model)), **counters(wrapper))

    # 4. update_params (no guard): DeepSpeed's own overflow check skips
    model, wrapper = make(stage)
    start = weights(model)
    with wrapper.optim_context(model):
        loss = model(batch(0, rank, bad=True)).square().mean()
    wrapper.update_params(loss)
    out['update_params'] = dict(skip_changed=max_diff(start, weights(model)), **counters(wrapper))

    # 5. paramwise_cfg reaches the engine: lr_mult 0 freezes the last layer
    model, wrapper = make(stage, paramwise_cfg=dict(custom_keys={'gen.2': dict(lr_mult=0.0)},
                                                    norm_decay_mult=0.0))
    start = weights(model)
    guarded(model, wrapper, batch(0, rank))
    end = weights(model)
    groups = [{k: v for k, v in g.items() if k in ('lr', 'weight_decay', 'name')}
              for g in wrapper.engine.optimizer.param_groups]
    out['paramwise'] = dict(groups=groups, last_changed=max(max_diff({k: start[k]}, {k: end[k]})
                                                            for k in start if k.startswith('gen.2.')),
                            first_changed=max_diff({'gen.0.weight': start['gen.0.weight']},
                                                   {'gen.0.weight': end['gen.0.weight']}))
    return out


def main(path):
    rank, world = _init()
    results = {f'zero{stage}': scenarios(stage, rank, world) for stage in (2, 3)}
    results['world_size'] = world
    with open(f'{path}.rank{rank}', 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1])
