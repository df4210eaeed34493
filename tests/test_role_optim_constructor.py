"""RoleOptimWrapperConstructor builds each role's parameter groups through
mmengine's DefaultOptimWrapperConstructor: paramwise_cfg works (shared or per
role), frozen parameters stay out, equal options share a group, lr_mult scales
a named role part."""
import pytest
import torch.nn as nn

from vdot_ext.engine.optim import RoleOptimWrapperConstructor


class TwoRoles(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        self.fake_score = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.discriminator = nn.Sequential(nn.Linear(8, 1))
        self.generator[0].weight.requires_grad_(False)   # e.g. a LoRA base weight

    def trainable_roles(self):
        return {'generator': [self.generator], 'critic': [self.fake_score, self.discriminator]}

    def role_param_groups(self, role):
        if role == 'generator':
            return [dict(name='generator', params=list(self.generator.parameters()))]
        return [dict(name='fake_score', params=list(self.fake_score.parameters())),
                dict(name='discriminator', params=list(self.discriminator.parameters()))]


def entry(lr, **kwargs):
    return dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=lr, weight_decay=0.1), **kwargs)


def summary(wrapper, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g['name'], g['lr'], g['weight_decay'], sorted(names[id(p)] for p in g['params']))
            for g in wrapper.optimizer.param_groups]


def test_without_paramwise_cfg_one_group_per_role_part():
    model = TwoRoles()
    built = RoleOptimWrapperConstructor(dict(generator=entry(1.0), critic=entry(2.0, lr_mult=dict(
        discriminator=0.5))))(model)
    assert summary(built['generator'], model) == [
        ('generator', 1.0, 0.1, ['generator.0.bias', 'generator.1.bias', 'generator.1.weight',
                                 'generator.2.bias', 'generator.2.weight'])]   # frozen weight left out
    assert summary(built['critic'], model) == [
        ('fake_score', 2.0, 0.1, ['fake_score.0.bias', 'fake_score.0.weight', 'fake_score.1.bias',
                                  'fake_score.1.weight']),
        ('discriminator', 1.0, 0.1, ['discriminator.0.bias', 'discriminator.0.weight'])]


def test_paramwise_cfg_shared_and_per_role():
    model = TwoRoles()
    built = RoleOptimWrapperConstructor(
        dict(generator=entry(1.0),
             critic=entry(2.0, lr_mult=dict(discriminator=0.5),
                          paramwise_cfg=dict(custom_keys={'discriminator.0.bias': dict(lr_mult=0.1)}))),
        paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.5))(model)
    generator = summary(built['generator'], model)
    # shared paramwise_cfg: LayerNorm without decay, biases at half decay
    assert ('generator', 1.0, 0.0, ['generator.1.bias', 'generator.1.weight']) in generator
    assert ('generator', 1.0, 0.05, ['generator.0.bias', 'generator.2.bias']) in generator
    assert ('generator', 1.0, 0.1, ['generator.2.weight']) in generator
    assert len(generator) == 3
    critic = summary(built['critic'], model)
    # the role's own paramwise_cfg replaces the shared one; lr_mult multiplies on top
    assert ('discriminator', 2.0 * 0.1 * 0.5, 0.1, ['discriminator.0.bias']) in critic
    assert ('discriminator', 2.0 * 0.5, 0.1, ['discriminator.0.weight']) in critic
    assert ('fake_score', 2.0, 0.1, ['fake_score.0.bias', 'fake_score.0.weight', 'fake_score.1.bias',
                                     'fake_score.1.weight']) in critic


def test_mistakes_are_named():
    model = TwoRoles()
    with pytest.raises(ValueError, match="lr_mult names unknown parameter groups \\['disc'\\]"):
        RoleOptimWrapperConstructor(dict(generator=entry(1.0), critic=entry(1.0, lr_mult=dict(disc=2.0))))(model)
    with pytest.raises(ValueError, match='exactly one entry per role'):
        RoleOptimWrapperConstructor(dict(generator=entry(1.0)))(model)
    with pytest.raises(ValueError, match='critic.optimizer is missing'):
        RoleOptimWrapperConstructor(dict(generator=entry(1.0), critic=dict(type='OptimWrapper')))(model)
