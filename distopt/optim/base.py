"""The base class every distopt optimizer derives from.

It holds two kinds of parameter groups:
- ``kind="adamw"``: element-wise AdamW (embeddings, the LM head, norms, biases, anything 1-D);
- ``kind="matrix"``: 2-D matrices, each stepped by the algorithm through a :class:`MatrixShardView`.

It also owns what every algorithm needs the same way: validation, explicit state allocation,
skipping parameters whose gradient is not finite, and a state dict keyed by parameter name.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.optim.adamw import adamw as _functional_adamw

from ..core import comm
from ..core.shard import MatrixShardView, whole_matrix_view

logger = logging.getLogger("distopt")

ADAM_FORMS = ("torch", "hf")
STATE_FORMAT = 1


def flat_shard_error(name: str, shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"parameter {name!r} reached the matrix group as a flat 1-D tensor of shape {tuple(shape)}. "
        "DeepSpeed ZeRO-1/2/3 and FSDP1 (FlatParameter) hand optimizers flat shards, which lose the "
        "row/column structure subspace methods need. Fix: build the engine with "
        "distopt.deepspeed.initialize(...) for ZeRO, or shard with FSDP2 fully_shard instead of FSDP1; "
        "to train this parameter element-wise instead, route it with rules=[(pattern, 'other')]."
    )


def check_lr(lr) -> None:
    value = float(lr)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr={lr!r}: the learning rate must be a finite number >= 0")


def check_common_hparams(group: dict) -> None:
    check_lr(group["lr"])
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r}: need two values in [0, 1)")
    if not (math.isfinite(group["eps"]) and group["eps"] >= 0):
        raise ValueError(f"eps={group['eps']!r}: must be a finite number >= 0")
    if not (math.isfinite(group["weight_decay"]) and group["weight_decay"] >= 0):
        raise ValueError(f"weight_decay={group['weight_decay']!r}: must be a finite number >= 0")
    if group.get("adam_form", "torch") not in ADAM_FORMS:
        raise ValueError(f"adam_form={group['adam_form']!r} is not one of {ADAM_FORMS}")


def update_moments(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float, form: str) -> None:
    """EMA of the gradient and its square, in place (op order of each form, for exact parity)."""
    if form == "hf":
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    else:
        exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg, exp_avg_sq, step: int, beta1: float, beta2: float, eps: float, lr: float, form: str):
    """Adam's normalized direction and its step size, so that the update is ``-step_size * direction``.

    ``torch`` is torch.optim.AdamW's form (eps added to the bias-corrected RMS). ``hf`` is the
    Hugging Face / galore-torch form (eps added to the raw RMS, correction folded into the step size).
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if form == "hf":
        return exp_avg / (exp_avg_sq.sqrt() + eps), lr * math.sqrt(bc2) / bc1
    return exp_avg / (exp_avg_sq.sqrt() / math.sqrt(bc2) + eps), lr / bc1


def apply_update(param, update, step_size: float, lr: float, weight_decay: float, form: str) -> None:
    """``param -= step_size * update`` with decoupled weight decay, in the order of ``form``."""
    if form == "torch" and weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-step_size)
    if form == "hf" and weight_decay:
        param.add_(param, alpha=-lr * weight_decay)


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: element-wise AdamW for the ``adamw`` group, the algorithm for ``matrix`` groups.

    Subclasses set ``algorithm``, ``matrix_roles`` (which parameter roles they take as matrices),
    ``shape_hparams`` (hyper-parameters that fix state shapes, checked when a checkpoint loads)
    and implement ``_init_matrix_state`` and ``_matrix_step``.
    """

    algorithm = "base"
    matrix_roles: frozenset = frozenset()
    shape_hparams: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = self._split_unnamed(groups)
        self._names: dict[torch.Tensor, str] = {}
        self._views: dict[torch.Tensor, MatrixShardView] = {}
        self._roles: dict[torch.Tensor, str] = {}
        self.nonfinite_skips: dict[str, int] = {}
        super().__init__(groups, defaults)

    @staticmethod
    def _split_unnamed(groups: list[dict]) -> list[dict]:
        """Groups built without names (``Opt(model.parameters())``) get ``param<i>`` names, and are
        split by dimensionality into matrix and element-wise groups."""
        out = []
        counter = 0
        for group in groups:
            group = dict(group)
            params = list(group["params"])
            if "param_names" in group and "kind" in group:
                group["params"] = params
                out.append(group)
                continue
            names = group.pop("param_names", None) or [f"param{counter + i}" for i in range(len(params))]
            counter += len(params)
            for kind in ("adamw", "matrix"):
                picked = [(p, n) for p, n in zip(params, names) if (p.dim() == 2) == (kind == "matrix")]
                if picked:
                    out.append({**group, "params": [p for p, _ in picked], "param_names": [n for _, n in picked], "kind": kind})
        return out

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(group["param_names"]) != len(group["params"]):
            raise ValueError("param_names must list one name per parameter")
        if group["kind"] not in ("adamw", "matrix"):
            raise ValueError(f"group kind={group['kind']!r} must be 'adamw' or 'matrix'")
        check_common_hparams(group)
        if group["kind"] == "matrix":
            self._check_matrix_hparams(group)
        roles = group.get("roles") or ["matrix" if group["kind"] == "matrix" else "other"] * len(group["params"])
        for p, name, role in zip(group["params"], group["param_names"], roles):
            if name in self._names.values():
                raise ValueError(f"parameter name {name!r} appears twice")
            self._names[p] = name
            self._roles[p] = role
            if group["kind"] == "matrix":
                self._views[p] = self._make_view(name, p)

    def _make_view(self, name: str, p: torch.Tensor) -> MatrixShardView:
        if type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor"):
            raise NotImplementedError(
                f"{name!r} is a DTensor (FSDP2/TP). Sharded execution is not available in this build; "
                "train it unsharded, or route it element-wise with rules=[(pattern, 'other')]."
            )
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if len(shape) != 2:
            raise flat_shard_error(name, shape)
        if tuple(p.shape) != shape:
            raise flat_shard_error(name, tuple(p.shape))
        return whole_matrix_view(name, p)

    # -- hooks for subclasses --------------------------------------------------------------
    @classmethod
    def prepare_model(cls, model: torch.nn.Module, hparams: dict) -> dict:
        """Called by ``build_optimizer`` before routing; may change the model and the hyper-parameters."""
        return hparams

    def _check_matrix_hparams(self, group: dict) -> None:
        """Validate algorithm-specific hyper-parameters of a matrix group."""

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        raise NotImplementedError

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------
    def param_name(self, p: torch.Tensor) -> str:
        return self._names[p]

    def param_role(self, p: torch.Tensor) -> str:
        """Routing role (``q``, ``v``, ``mlp_in``, ``embedding``, ...; see ``core.routing``)."""
        return self._roles[p]

    @torch.no_grad()
    def allocate_state(self) -> None:
        """Create every state tensor at its final shape, before any step.

        Checkpoint loaders (``load_state_dict``, DCP) then write into pre-sized tensors, and
        ``state_bytes`` is exact from the start. Idempotent.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                if group["kind"] == "adamw":
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                else:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                    self._init_matrix_state(p, state, group, self._views[p])

    # -- step -------------------------------------------------------------------------------
    def _finite_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop parameters whose gradient holds NaN or Inf (on any rank holding part of them).

        A skipped parameter keeps its value, moments, basis and step count for this step.
        """
        if not params:
            return params
        peaks = torch.stack([p.grad.detach().abs().amax().float() if p.grad.numel() else p.grad.new_zeros((), dtype=torch.float32) for p in params])
        bad = (~torch.isfinite(peaks)).float()
        groups = {self._views[p].group for p in params if p in self._views} - {None}
        for pg in groups:  # every holder of a shard must take the same decision
            comm.all_reduce_max(bad, pg)
        keep = []
        for p, flag in zip(params, bad.tolist()):
            if flag:
                name = self._names[p]
                if name not in self.nonfinite_skips:
                    logger.warning("distopt: non-finite gradient for %s; skipping its update (state untouched)", name)
                self.nonfinite_skips[name] = self.nonfinite_skips.get(name, 0) + 1
            else:
                keep.append(p)
        return keep

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "matrix":
                for p in group["params"]:
                    if p.dim() != 2:  # an engine swapped in a flat partition after construction
                        raise flat_shard_error(self._names.get(p, "<unnamed>"), tuple(p.shape))
        self.allocate_state()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            params = self._finite_params(params)
            if group["kind"] == "adamw":
                self._adamw_step(group, params)
            else:
                for p in params:
                    self._matrix_step(p, p.grad, self.state[p], group, self._views[p])
        return loss

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, form = float(group["lr"]), group["eps"], group["weight_decay"], group.get("adam_form", "torch")
        if form == "torch":
            native = [p for p in params if p.dtype == torch.float32]
            if native:
                states = [self.state[p] for p in native]
                _functional_adamw(
                    native, [p.grad for p in native], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                    amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False,
                )
            params = [p for p in params if p.dtype != torch.float32]
        for p in params:  # fp32 math for low-precision parameters, and the hf form
            state = self.state[p]
            grad = p.grad.float()
            state["step"] += 1
            update_moments(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2, form)
            direction, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], int(state["step"]), beta1, beta2, eps, lr, form)
            master = p.float() if p.dtype != torch.float32 else p
            apply_update(master, direction, step_size, lr, wd, form)
            if master is not p:
                p.copy_(master)

    # -- checkpoints ------------------------------------------------------------------------
    def _shape_signature(self) -> list[dict]:
        return [
            {key: group[key] for key in self.shape_hparams if key in group}
            for group in self.param_groups
            if group["kind"] == "matrix"
        ]

    def state_dict(self) -> dict:
        """Tensors and plain values only, keyed by parameter name; loads with ``weights_only=True``."""
        self.allocate_state()
        state = {self._names[p]: dict(s) for p, s in self.state.items()}
        groups = []
        for group in self.param_groups:
            saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k not in ("params", "param_names")}
            saved["params"] = list(group["param_names"])
            groups.append(saved)
        meta = {"algorithm": self.algorithm, "format": STATE_FORMAT, "shape_hparams": self._shape_signature()}
        return {"state": state, "param_groups": groups, "distopt": meta}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict.get("distopt")
        if meta is None:
            raise ValueError(
                "this state dict was not written by a distopt optimizer (no 'distopt' entry); "
                "load it into the optimizer class that saved it"
            )
        if meta["algorithm"] != self.algorithm:
            raise ValueError(
                f"checkpoint holds state of optimizer {meta['algorithm']!r}, but this is {self.algorithm!r}; "
                f"build the optimizer with name={meta['algorithm']!r} to resume"
            )
        mine = self._shape_signature()
        if [dict(d) for d in meta["shape_hparams"]] != mine:
            raise ValueError(
                f"checkpoint was written with {meta['shape_hparams']} but this optimizer has {mine}; "
                "these hyper-parameters fix the state shapes, so build the optimizer with the checkpoint's values"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}")
        by_name = {name: p for p, name in self._names.items()}
        saved_state = state_dict["state"]
        unknown = sorted(set(saved_state) - set(by_name))
        missing = sorted(set(by_name) - set(saved_state))
        if unknown or missing:
            raise ValueError(f"checkpoint parameters do not match: unknown {unknown[:5]}, missing {missing[:5]}")
        self.allocate_state()
        for name, entries in saved_state.items():
            target = self.state[by_name[name]]
            if set(entries) != set(target):
                raise ValueError(f"{name}: checkpoint state keys {sorted(entries)} differ from {sorted(target)}")
            for key, value in entries.items():
                if tuple(value.shape) != tuple(target[key].shape):
                    raise ValueError(f"{name}.{key}: checkpoint shape {tuple(value.shape)} != {tuple(target[key].shape)}")
                target[key].copy_(value)
        for group, saved in zip(self.param_groups, saved_groups):
            if list(saved["params"]) != list(group["param_names"]):
                raise ValueError("checkpoint parameter groups list different parameters")
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every optimizer-state tensor this rank holds, projection matrices included.

    Counts whole storages, deduplicated, so a state tensor that is a view of a larger buffer (a
    leaked ``U`` of an SVD, say) is charged for the buffer it keeps alive. Works for any
    ``torch.optim.Optimizer``, including state held inside helper objects.
    """
    seen: dict[int, int] = {}

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            local = getattr(value, "_local_tensor", value)
            storage = local.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth)
        elif depth < 2 and hasattr(value, "__dict__"):
            for v in vars(value).values():
                visit(v, depth + 1)

    for state in optimizer.state.values():
        visit(state)
    return sum(seen.values())
