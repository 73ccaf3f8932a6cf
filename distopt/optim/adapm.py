"""AdaPM: Adaptive Partial Momentum (Zhang, Liu, Fang; arXiv 2510.09103)."""

from __future__ import annotations

import math

import torch

from ..core import batching, comm, lowrank, subspace
from ..core.linalg import stable_seed
from ..core.options import check_option
from ..core.schedule import is_refresh_step, refresh_index, refresh_phase
from ..core.shard import MatrixShardView, local
from .base import SubspaceOptimizer, apply_update, hyperparameters

# Momentum design per parameter role (the paper's Section 4.1, extended to the roles it leaves open).
MOMENTUM_BY_ROLE = {
    "embedding": "none",
    "o": "none",
    "q": "lowrank",
    "k": "lowrank",
    "mlp_in": "lowrank",
    "mlp_out": "lowrank",
    "v": "full",
    "qkv": "full",
    "matrix": "full",
    "lm_head": "full",
}


class AdaPM(SubspaceOptimizer):
    r"""AdaPM: no, low-rank or full momentum per block role, an element-wise second moment and an
    element-wise clipped update.

    For each matrix ``W`` (global ``m x n``) with gradient ``G``, step ``t`` (from 1) and
    ``c_1 = 1 - \beta_1^t``, ``c_2 = 1 - \beta_2^t`` (both 1 when ``bias_correction=False``):

    .. math::
        \begin{aligned}
        &V \leftarrow \beta_2 V + (1-\beta_2) G^2\\
        &\hat M = \begin{cases}
          G & \text{embedding, attention output } o \text{ (no momentum, } \beta_1 = 0)\\
          M/c_1,\ M \leftarrow \beta_1 M + (1-\beta_1) G & v, \text{lm\_head}, qkv, \text{other linears (full)}\\
          LR/c_1 + (m_t - LR)/(1-\beta_1) & q, k, \text{MLP (low rank, rank } r)
        \end{cases}\\
        &m_t = (1-\beta_1) G + \beta_1 L R, \quad (L, R) \leftarrow \mathrm{fit}(m_t)\\
        &W \leftarrow W(1-\eta\lambda) - \eta\,\mathrm{clip}\Big(\frac{\hat M}{\sqrt{V/c_2}+\epsilon}, -\kappa, \kappa\Big)
        \end{aligned}

    ``fit`` is :func:`distopt.core.lowrank.fit`: ``L`` (``m x r``, orthonormal) and ``R`` (``r x n``)
    are refit to ``m_t`` every step by ``fit_sweeps`` alternating-least-squares sweeps warm-started
    from the previous factors; on the first step and then every ``update_proj_gap`` steps
    (staggered by name) ``L`` is re-seeded by a randomized range finder of ``m_t`` seeded from
    ``(seed, name, refresh index)``. ``correction`` picks the low-rank estimate: ``derived`` (above),
    ``literal`` (``m_t/c_1 - (m_t - LR)/(1-\beta_1)``, line 8 of the paper's Algorithm 1 as
    printed) or ``none`` (``LR/c_1``). Norms and biases go to element-wise AdamW (no clip).

    Defaults: ``lr=1e-3``, ``betas=(0.9, 0.95)`` and ``weight_decay=0.1`` (the paper's Section 5
    setup, shared with its AdamW and Adam-mini baselines), ``eps=1e-8``,
    ``rank_fraction=0.05`` (``rank=None``), ``update_proj_gap=100``, ``fit_sweeps=1``,
    ``correction="derived"``, ``clip=1.0``, ``bias_correction=True``, ``oversample=8``,
    ``power_iters=1``, ``stagger=True``, ``adam_form="torch"``. The element-wise group (norms and
    biases) is not decayed unless ``elementwise={"weight_decay": ...}`` says so, as in the nanoGPT
    code the paper trains with (it decays only parameters of two or more dimensions).

    Where we differ from the paper, and why:
    - Rank: ``r = floor(rank_fraction * m n / (m + n))`` (at least 1, at most ``min(m, n)``), i.e.
      the factors hold 5% of the matrix's entries. The text only says "5% of the dimensions"; this
      reading reproduces the paper's GPT-2-1.5B memory table exactly, "5% of min(m, n)" does not.
      ``rank=`` overrides it with a fixed rank for every low-rank matrix.
    - Correction: the paper's Algorithm 1 subtracts the residual and its eq. (3) flips its sign;
      neither is unbiased. ``derived`` is the estimator whose bias vanishes for stationary
      residuals (the stored error obeys ``e_t = beta1 e_{t-1} + res_t``); ``literal`` keeps the
      printed form for ablations.
    - Fit: the paper runs ~10 gradient-descent iterations from ``L = R = 0`` (where gradient descent
      cannot move) with no step size given. We use orthonormal ALS (subspace iteration), which
      needs no step size, seeded by the range finder. The paper's "update frequency T" is not
      defined; we read it as the re-seeding period. ``fit_sweeps=0`` gives the other reading (the
      subspace is fitted only every ``T`` steps and ``R = L^T m_t`` in between).
    - Bias correction: Algorithm 1 has none; with ``v`` starting at 0 every coordinate then clips
      to ``+-1`` (sign descent) for the first ``~1/(1-beta2)`` steps. ``bias_correction=True``
      (default) divides the zero-started EMAs (``v``, full ``M``, ``LR``) by ``c_2``/``c_1``; the
      residual term is already a full-history estimate and is not rescaled.
      ``bias_correction=False`` is Algorithm 1.
    - Roles the paper leaves open: an untied ``lm_head``, fused ``qkv`` and unrecognised linears get
      full momentum (conservative: Table 1 shows low-rank momentum hurts most on V). Re-route a
      parameter with ``rules=[(pattern, role)]`` to change its design.
    - ``clip`` is ``kappa`` (1 in the paper); ``clip=None`` disables it.

    State per matrix (fp32; ``step`` int64, 8 bytes; ``r`` as above), in bytes:
    low rank (q, k, MLP) ``8 + 4 (r (m + n) + m n)``; full (v, lm_head, qkv, other)
    ``8 + 8 m n``; none (embedding, o) ``8 + 4 m n``. Element-wise AdamW parameters:
    ``4 + 8 N``. Under row sharding ``m`` is this rank's row count, and ``R`` keeps ``n/N`` of its
    columns (``state_layout="partitioned"``, the default; ``"replicated"`` keeps it whole).

    In one process, fp32 matrices of one momentum kind, shape (and rank) and step count step as a
    batch: the gradients stacked, the second moments and momenta on packed state (a low-rank refit
    as batched products and one batched orthonormalization per sweep, ``m_t`` made over the stacked
    gradients), the ratio and its clip on the stack, and one kernel for the weights; at most
    ``coalesce_bytes`` of three full-size temporaries per member. One by one: row shards (their
    refits and block sums need collectives per matrix), bf16 weights, factors re-seeded this step,
    and a matrix with no partner.
    """

    algorithm = "adapm"
    matrix_roles = frozenset(MOMENTUM_BY_ROLE)
    elementwise_defaults = {"weight_decay": 0.0}
    shape_hparams: tuple[str, ...] = ("rank", "rank_fraction")

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank_fraction: float = 0.05,
        rank: int | None = None,
        update_proj_gap: int = 100,
        fit_sweeps: int = 1,
        correction: str = "derived",
        clip: float | None = 1.0,
        bias_correction: bool = True,
        stagger: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        oversample: int = 8,
        power_iters: int = 1,
        adam_form: str = "torch",
        seed: int = 0,
        state_layout: str = "partitioned",
    ):
        super().__init__(params, hyperparameters(locals()))

    # -- validation ---------------------------------------------------------------------------
    def _check_matrix_hparams(self, group: dict) -> None:
        check_option(group, "rank_fraction", low=0, low_open=True, high=1, note="e.g. 0.05")
        check_option(group, "rank", "int", low=1, optional="for rank_fraction")
        check_option(group, "update_proj_gap", "int", low=1)
        check_option(group, "fit_sweeps", "int", low=0, high=64, note="sweeps per step")
        for key in ("oversample", "power_iters", "seed"):
            check_option(group, key, "int", low=0)
        check_option(group, "correction", "choice", choices=lowrank.CORRECTIONS)
        check_option(group, "clip", low=0, low_open=True, optional="for no clip")
        subspace.check_state_layout(group)
        for key in ("bias_correction", "stagger"):
            check_option(group, key, "bool")

    # -- per-role design ------------------------------------------------------------------------
    def momentum_kind(self, view: MatrixShardView) -> str:
        """``none``, ``lowrank`` or ``full`` for a matrix, from the role of its name."""
        return MOMENTUM_BY_ROLE.get(self.role_by_name(view.name), "full")

    def rank_of(self, view: MatrixShardView, group: dict) -> int:
        return lowrank.lowrank_rank(view.global_shape, group["rank_fraction"], group["rank"])

    # -- second moment (element-wise here; block-wise in adapm-mini) ----------------------------
    def _init_second_moment(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        state["exp_avg_sq"] = torch.zeros((view.local_rows, view.n), dtype=torch.float32, device=p.device)

    def _update_second_moment(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                              view: MatrixShardView) -> torch.Tensor:
        """Update the second moment and return it broadcastable to the local rows."""
        beta2 = group["betas"][1]
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return state["exp_avg_sq"]

    # -- state and step -------------------------------------------------------------------------
    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        kind = self.momentum_kind(view)
        if kind == "lowrank":
            r = self.rank_of(view, group)
            start, end = view.chunk(view.n) if subspace.is_partitioned(view, group) else (0, view.n)
            state["left"] = torch.zeros((view.local_rows, r), dtype=torch.float32, device=p.device)
            state["right"] = torch.zeros((r, end - start), dtype=torch.float32, device=p.device)
        elif kind == "full":
            state["exp_avg"] = torch.zeros((view.local_rows, view.n), dtype=torch.float32, device=p.device)
        self._init_second_moment(p, state, group, view)

    def _momentum(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView,
                  step: int) -> torch.Tensor:
        """Bias-corrected momentum estimate for step ``step`` (counted from 1)."""
        beta1 = group["betas"][0]
        kind = self.momentum_kind(view)
        if kind == "none":
            return grad
        c1 = 1.0 - beta1**step if group["bias_correction"] else 1.0
        if kind == "full":
            state["exp_avg"].lerp_(grad, 1.0 - beta1)
            return state["exp_avg"] / c1
        gap = group["update_proj_gap"]
        phase = refresh_phase(view.name, gap, group["stagger"])
        done = step - 1  # steps taken before this one
        return lowrank.momentum_estimate(
            grad, state["left"], state["right"], view,
            beta1=beta1, step=step, bias_correction=group["bias_correction"], correction=group["correction"],
            reseed=is_refresh_step(done, gap, phase), sweeps=group["fit_sweeps"],
            seed=stable_seed(group["seed"], view.name, refresh_index(done, gap, phase)),
            oversample=group["oversample"], power_iters=group["power_iters"],
            chunked=subspace.is_partitioned(view, group),
        )

    def _chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        view = self._views[p]
        if self.momentum_kind(view) != "lowrank" or not subspace.is_partitioned(view, group):
            return {}
        return {"right": ((self.rank_of(view, group), view.n), 1)}

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        step = int(state["step"]) + 1
        grad = grad.float()
        self._finish_step(p, grad, self._momentum(p, grad, state, group, view, step), state, group, view, step)

    def _batch_key(self, p: torch.Tensor, group: dict, done: int):
        """What a matrix that made ``done`` steps shares with the others it steps with as a batch (one
        process, fp32 weights: momentum kind, shapes, step count, second-moment layout), else None.
        A low-rank matrix whose factors are re-seeded this step steps alone."""
        view = self._views[p]
        if local(p).dtype != torch.float32 or (view.sharded and comm.world_size(view.group) > 1):
            return None
        kind, shape = self.momentum_kind(view), tuple(local(p).shape)
        if kind == "lowrank":
            gap = group["update_proj_gap"]
            if done == 0 or is_refresh_step(done, gap, refresh_phase(view.name, gap, group["stagger"])):
                return None
            shape += tuple(self.state[p]["left"].shape[1:])
        return kind, shape, done + 1, self._second_moment_key(group, view)

    def _second_moment_key(self, group: dict, view: MatrixShardView) -> tuple:
        """What matrices must share for :meth:`_update_second_moments` to treat them as one batch."""
        return ()

    def _update_second_moments(self, grads: torch.Tensor, packing: batching.PackedState, group: dict,
                               view: MatrixShardView) -> torch.Tensor:
        """:meth:`_update_second_moment` of a batch from its stacked gradients (``view``: any member's),
        broadcastable to them."""
        beta2 = group["betas"][1]
        second, copied = packing.get("exp_avg_sq")
        second.mul_(beta2).addcmul_(grads, grads, value=1.0 - beta2)
        if copied:
            packing.store_back("exp_avg_sq", second)
        return second

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        """Matrices of one momentum kind, shape (and rank), step count and second-moment layout step as
        a batch (:meth:`_step_batch`), in runs of at most ``coalesce_bytes`` of their temporaries;
        the rest (row shards, bf16 weights, re-seeded factors) one by one."""
        done = dict(zip(map(id, params), torch.stack([self.state[p]["step"] for p in params]).tolist())) if params else {}
        # Three full-size temporaries at a time: the stacked gradients (m_t over them for a low-rank
        # refit, then its denominators) and L R (the estimate); else the stack (then the momentum) and
        # the denominators. The third: the second moments read as a copy where the batch is not the
        # one their buffer was packed for (a member re-seeded this step steps alone).
        self._step_by_batches(group, params, lambda p: self._batch_key(p, group, done[id(p)]), 3,
                              lambda g, members, key: self._step_batch(g, members, key[0], key[2]))

    def _step_batch(self, group: dict, params: list[torch.Tensor], kind: str, step: int) -> None:
        """:meth:`_matrix_step` of matrices that share a momentum kind, shape and step count, with one
        kernel per operation for all of them: the gradients stacked, the second moments and the
        momentum on packed state (a low-rank refit as batched products and one batched
        orthonormalization per sweep), the ratio and its clip on the stack, and one update kernel for
        the weights. The same numbers up to the rounding of batched kernels. One matrix alone takes
        the per-matrix step."""
        if len(params) == 1:
            p = params[0]
            self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
            return
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        states = [self.state[p] for p in params]
        packing = batching.PackedState(states)
        grads = torch.stack([local(p.grad) for p in params]).float()
        second = self._update_second_moments(grads, packing, group, self._views[params[0]])
        c1 = 1.0 - beta1**step if group["bias_correction"] else 1.0
        if kind == "none":
            momentum = grads
        elif kind == "full":
            avg, copied = packing.get("exp_avg")
            avg.lerp_(grads, 1.0 - beta1)
            if copied:
                packing.store_back("exp_avg", avg)
            momentum = torch.div(avg, c1, out=grads)  # the gradients are read: their buffer takes it
        else:  # m_t is made over the stacked gradients; the factors packed, so read and written in place
            packing.get("left")
            packing.get("right")
            momentum = lowrank.momentum_estimates(
                list(grads.unbind(0)), [s["left"] for s in states], [s["right"] for s in states], beta1=beta1,
                step=step, bias_correction=group["bias_correction"], correction=group["correction"],
                sweeps=group["fit_sweeps"], target=grads)
        c2 = 1.0 - beta2**step if group["bias_correction"] else 1.0
        # A low-rank estimate is a new tensor: the stack's buffer (m_t) is free for the denominators.
        spare = grads if kind == "lowrank" and second.shape == grads.shape else None
        denom = torch.sqrt(second, out=spare)
        if group["adam_form"] == "hf":  # eps on the raw RMS, as Hugging Face's AdamW
            denom.add_(group["eps"]).div_(math.sqrt(c2))
        else:
            denom.div_(math.sqrt(c2)).add_(group["eps"])
        del grads
        ratio = momentum.div_(denom)
        del denom
        if group["clip"] is not None:
            ratio.clamp_(-group["clip"], group["clip"])
        # torch's form decays before the step (w (1 - lr wd) - lr ratio), hf's after ((w - lr ratio) (1 - lr wd)).
        ratio.mul_(-lr * (1.0 - lr * wd) if group["adam_form"] == "hf" else -lr)
        torch._foreach_add_([s["step"] for s in states], 1)
        batching.add_updates([local(p) for p in params], ratio.unbind(0), lr * wd)

    def _finish_step(self, p: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, state: dict, group: dict,
                     view: MatrixShardView, step: int) -> None:
        """The second moment, the clipped ratio and the update, from this step's ``momentum``."""
        second = self._update_second_moment(p, grad, state, group, view)
        c2 = 1.0 - group["betas"][1] ** step if group["bias_correction"] else 1.0
        # In place on one temporary: a matrix stepped alone may be the largest (an embedding).
        denom = second.sqrt()
        if group["adam_form"] == "hf":  # eps on the raw RMS, as Hugging Face's AdamW
            denom.add_(group["eps"]).div_(math.sqrt(c2))
        else:
            denom.div_(math.sqrt(c2)).add_(group["eps"])
        ratio = torch.div(momentum, denom, out=denom) if denom.shape == momentum.shape else momentum / denom
        if group["clip"] is not None:
            ratio.clamp_(-group["clip"], group["clip"])
        state["step"] += 1
        lr = float(group["lr"])
        apply_update(p, ratio, lr, lr, group["weight_decay"], group["adam_form"])
