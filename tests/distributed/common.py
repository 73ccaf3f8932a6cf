"""A model with odd shapes (uneven row shards on 2 and 3 ranks), data, and per-optimizer settings."""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

import distopt
from distopt.optim import REGISTRY

VOCAB, HIDDEN, WIDE, MLP = 41, 37, 53, 61
GLOBAL_BATCH, SEQ = 12, 8  # divisible by 2, 3 and 4 ranks


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(HIDDEN, WIDE, bias=False)  # 53 x 37: right basis
        self.self_attn.v_proj = nn.Linear(HIDDEN, WIDE, bias=False)
        self.self_attn.o_proj = nn.Linear(WIDE, HIDDEN, bias=False)  # 37 x 53: left basis
        self.post_attention_layernorm = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(HIDDEN, MLP, bias=True)  # 61 x 37 and a bias
        self.mlp.down_proj = nn.Linear(MLP, HIDDEN, bias=False)  # 37 x 61

    def forward(self, x):
        attn = self.self_attn
        x = x + attn.o_proj(torch.tanh(attn.q_proj(x)) * attn.v_proj(x))
        return x + self.mlp.down_proj(F.silu(self.mlp.up_proj(self.post_attention_layernorm(x))))


class OddNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = types.SimpleNamespace(num_attention_heads=1, num_key_value_heads=1, hidden_size=HIDDEN)
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def local_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world_size
    return global_batch(step)[rank * per : (rank + 1) * per]


def hparams(name: str) -> dict:
    """Small ranks and gaps so every algorithm refreshes several times in a few steps."""
    accepted = inspect.signature(REGISTRY[name].__init__).parameters
    wanted = dict(lr=1e-2, rank=5, update_proj_gap=3, tau=3, n_heads=1, n_kv_heads=1)
    return {k: v for k, v in wanted.items() if k in accepted}


def shard(model: nn.Module, world_size: int, mesh_shape=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (world_size,))
    else:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_steps(model, optimizer, steps, rank=0, world_size=1, start=0):
    for step in range(start, start + steps):
        loss = model(local_batch(step, rank, world_size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    """Whole parameters and buffers by name (a tensor may be either: RSO's P, by its layout)."""
    out = {}
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = value.detach().clone()
    return out


def prepare(model: nn.Module, name: str, **extra) -> nn.Module:
    """Model surgery an algorithm needs before ``fully_shard`` (RSO's ``reparametrize``), if any."""
    reparametrize = getattr(REGISTRY[name], "reparametrize", None)
    if reparametrize is not None:
        reparametrize(model, **hparams(name), **extra)
    return model


def build(model, name):
    return distopt.build_optimizer(model, name, **hparams(name))
