"""A plain optimizer step reads no device value per matrix: the host waits on the device a constant
number of times, however large the model."""

import collections
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distopt
from distopt.models import LlamaShape, TinyLlama
from distopt.optim import REGISTRY, projected

# Ops that copy a device value to the host (``.item()``, ``bool()``, ``torch.equal``, LAPACK error checks).
SYNCING = {"aten._local_scalar_dense.default", "aten.equal.default", "aten._linalg_check_errors.default",
           "aten.is_nonzero.default"}


class HostReads(TorchDispatchMode):
    """Counts syncing ops on tensors other than ``host`` (the step counters, which live on the CPU
    whatever the parameters' device)."""

    def __init__(self, host: list[torch.Tensor]):
        super().__init__()
        self.host = {id(t) for t in host}
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING and not (args and id(args[0]) in self.host):
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _plain_step_reads(name: str, layers: int, batches_check_themselves: bool = False) -> int:
    torch.manual_seed(0)
    model = TinyLlama(LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                 num_attention_heads=4))
    accepted = inspect.signature(REGISTRY[name].__init__).parameters
    hparams = {k: v for k, v in dict(rank=4, update_proj_gap=100, tau=100, stagger=False).items() if k in accepted}
    with pytest.MonkeyPatch.context() as patch:
        # Off: the parameters stand for a GPU's, where no batch reads its own check (see the test below).
        patch.setattr(projected, "SELF_CHECKING_DEVICES", frozenset({"cpu"} if batches_check_themselves else ()))
        opt = distopt.build_optimizer(model, name, **hparams)
        return _reads_of_a_plain_step(model, opt)


def _reads_of_a_plain_step(model, opt) -> int:
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(2):  # the first step takes the first bases; the second is plain
        model(ids, ids).backward()
        opt.allocate_state()
        steps = [s["step"] for s in opt.state.values() if "step" in s]
        with HostReads(steps) as reads:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(reads.counts.values())


@pytest.mark.parametrize("name", distopt.list_optimizers())
def test_a_plain_step_reads_no_device_value_per_matrix(name):
    assert _plain_step_reads(name, 2) == _plain_step_reads(name, 8) == 0


@pytest.mark.parametrize("name", ["galore", "grassjump"])
def test_on_cpu_each_batch_reads_its_own_check_once(name):
    """On the CPU (no device to wait for) each batch checks its stacked gradients and reads the flag:
    one read per batch, the same for 2 layers as for 8 (3 shapes, 3 batches)."""
    assert _plain_step_reads(name, 2, True) == _plain_step_reads(name, 8, True) == 3


@pytest.mark.parametrize("batches_check_themselves", [False, True])
def test_one_finiteness_decision_per_step_for_all_groups(monkeypatch, batches_check_themselves):
    """Matrix and element-wise groups share one flag stack and one host read per ``step()``; on the
    CPU the batched matrices are left to their batches' own checks."""
    from distopt.optim.base import SubspaceOptimizer

    monkeypatch.setattr(projected, "SELF_CHECKING_DEVICES", frozenset({"cpu"} if batches_check_themselves else ()))
    calls = []
    real = SubspaceOptimizer._finite_params
    monkeypatch.setattr(SubspaceOptimizer, "_finite_params", lambda self, params: calls.append(len(params)) or real(self, params))
    torch.manual_seed(0)
    model = TinyLlama(LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4))
    opt = distopt.build_optimizer(model, "galore", rank=4)
    assert len(opt.param_groups) == 2
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    matrices = len(next(g["params"] for g in opt.param_groups if g["kind"] == "matrix"))
    assert calls == [len(list(model.parameters())) - (matrices if batches_check_themselves else 0)] * 3
