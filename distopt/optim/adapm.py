"""AdaPM: Adaptive Partial Momentum (Zhang, Liu, Fang; arXiv 2510.09103)."""

from __future__ import annotations

import math

import torch

from ..core import comm, lowrank, subspace
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

    # Bytes of stacked full-size tensors (m_t and L R) a batch of low-rank refits holds at once.
    coalesce_bytes = 768 << 20

    def _batch_key(self, p: torch.Tensor, group: dict):
        """``(shape, rank, step)`` of a low-rank matrix whose refit this step can be batched with others
        of the same key (one process, no reseed), else None."""
        view, state = self._views[p], self.state[p]
        if self.momentum_kind(view) != "lowrank" or (view.sharded and comm.world_size(view.group) > 1):
            return None
        done = int(state["step"])
        if done == 0 or is_refresh_step(done, group["update_proj_gap"], refresh_phase(view.name, group["update_proj_gap"], group["stagger"])):
            return None
        return tuple(state["left"].shape), tuple(state["right"].shape), done + 1

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        """Low-rank matrices of one shape, rank and step count refit their factors together (batched
        products, one batched orthonormalization per sweep), in batches of at most ``coalesce_bytes``;
        the second moment and the update stay per matrix. Everything else steps one by one."""
        batches: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            key = self._batch_key(p, group)
            if key is None:
                self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
                continue
            batch = batches.setdefault(key, [])
            if batch and (len(batch) + 1) * 8 * p.numel() > self.coalesce_bytes:
                self._step_lowrank_batch(group, batch, key[2])
                batch = batches[key] = []
            batch.append(p)
        for key, batch in batches.items():
            self._step_lowrank_batch(group, batch, key[2])

    def _step_lowrank_batch(self, group: dict, params: list[torch.Tensor], step: int) -> None:
        if len(params) == 1:
            p = params[0]
            self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
            return
        states = [self.state[p] for p in params]
        momenta = lowrank.momentum_estimates(
            [local(p.grad) for p in params], [s["left"] for s in states], [s["right"] for s in states],
            beta1=group["betas"][0], step=step, bias_correction=group["bias_correction"],
            correction=group["correction"], sweeps=group["fit_sweeps"])
        for p, state, momentum in zip(params, states, momenta):
            self._finish_step(local(p), local(p.grad).float(), momentum, state, group, self._views[p], step)

    def _finish_step(self, p: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, state: dict, group: dict,
                     view: MatrixShardView, step: int) -> None:
        """The second moment, the clipped ratio and the update, from this step's ``momentum``."""
        second = self._update_second_moment(p, grad, state, group, view)
        c2 = 1.0 - group["betas"][1] ** step if group["bias_correction"] else 1.0
        if group["adam_form"] == "hf":  # eps on the raw RMS, as Hugging Face's AdamW
            denom = (second.sqrt() + group["eps"]) / math.sqrt(c2)
        else:
            denom = second.sqrt() / math.sqrt(c2) + group["eps"]
        ratio = momentum / denom
        if group["clip"] is not None:
            ratio.clamp_(-group["clip"], group["clip"])
        state["step"] += 1
        lr = float(group["lr"])
        apply_update(p, ratio, lr, lr, group["weight_decay"], group["adam_form"])
