"""DeepSpeed ZeRO-0/1/2/3 with distopt optimizers: row-block views rebuilt from ZeRO's flat partitions.

What ZeRO hands a client optimizer
----------------------------------
ZeRO-1/2 flatten each parameter group into one buffer (padded to a multiple of ``2 x dp``), cut it
into ``dp`` equal contiguous partitions and put this rank's fp32 partition, a 1-D tensor, into the
group in place of its parameters. ZeRO-3 cuts every parameter into ``ceil(numel / dp)`` slices and
packs slices into sub-groups that are swapped into the group for one ``step()`` call each. Either
way a partition is an arbitrary flat range: it can start in the middle of a row and, with the usual
single group, span many parameters. A subspace method cannot run on that.

The mechanism, and why
----------------------
1. One parameter group per parameter. DeepSpeed keeps custom group keys, so every group still
   says which parameter it holds (``param_names``), its role, its kind and (through the optimizer)
   its global shape. A rank's partition of a group is then one contiguous flat range ``[a, b)`` of
   one row-major ``m x n`` parameter: ``a = k S`` and ``b = min(a + S, m n)``, with ``S`` the partition
   length (ZeRO-1/2: the group's padded size over ``dp``; ZeRO-3: ``ceil(m n / dp)``). The adapter
   reads ``S``, the process group and the parameter from DeepSpeed's own partition metadata after
   the engine is built and checks it against this formula, so a change in DeepSpeed's layout fails
   loudly instead of stepping the wrong elements.
2. A flat range becomes a row block. Rank ``k`` owns the rows whose first element it holds, rows
   ``[ceil(a/n), ceil(b/n))``; these blocks are contiguous over ranks and cover the matrix, exactly
   like an uneven FSDP2 ``Shard(0)``. The elements a rank holds at the head of its partition belong
   to the last row of an earlier rank; before the step one all-gather of at most ``n - 1``
   parameter and ``n - 1`` gradient values per rank (plus a not-finite flag) brings each owner the
   tail of its last row, the unchanged algorithm (``step_matrix``) runs on the full row block with
   the data-parallel group in its :class:`MatrixShardView`, and a second all-gather sends the new
   values of each tail back to the rank that holds them. Padding is never touched. When the
   partitions happen to be row-aligned both gathers are skipped (only a 1-element flag all-reduce
   keeps the skip decision common). Cost: at most ``~3 P n`` floats per matrix per step, no
   full-matrix gather, and the state stays sharded by rows (``m x r`` moments per rank ``/ P``).
3. Once per optimizer step. DeepSpeed calls the client ``step()`` only at the gradient
   accumulation boundary (per group in ZeRO-1/2, per sub-group in ZeRO-3), after the gradients of all
   micro-batches are reduced; the adapter steps exactly the group DeepSpeed put a partition in.
   Nothing runs in gradient hooks, so micro-batches never advance the state.
4. Gradient clipping acts on the raw gradient. DeepSpeed computes the global norm from the reduced
   gradient partitions before any ``step()`` and scales each partition's gradient by
   ``min(1, clip / (norm + 1e-6))``; the algorithm then projects that clipped raw gradient. This is
   ``torch.nn.utils.clip_grad_norm_`` followed by the optimizer, as in one process. (DeepSpeed's own
   Muon clips its orthogonalized update instead.)
5. ``zero.Init`` placeholders (empty tensors) are routed and viewed by ``ds_shape``.
6. Element-wise parameters (embeddings, norms, biases, the LM head) are AdamW on their flat slice.

Alternatives considered: an engine hook in ``get_flat_partition`` / the ZeRO-3 reduce path (what
DeepSpeed did for Muon) needs a fork and runs per micro-batch under ZeRO-3; ``safe_get_full_grad``
gathers every full matrix on every rank; row-aligned groups only work when ``m % dp == 0``. The
row-block exchange needs none of DeepSpeed's internals beyond the partition layout, works for any
``m`` (5461 rows included) and any ``dp``, and reuses the FSDP2-tested code path.

State, checkpoints and resizing
-------------------------------
State is keyed by the model parameter and saved by name: ``engine.save_checkpoint`` stores each
rank's row blocks and flat slices in DeepSpeed's per-rank files, with the layout under
``state_dict()["distopt"]["engine"]``. ``engine.load_checkpoint`` on the same data-parallel size
resumes exactly. On a different size it is refused before anything is loaded, with the fix:
``python -m distopt.deepspeed convert CKPT OUT`` writes one name-keyed file (fp32 weights, full
optimizer state, scheduler and step counters) that :func:`load_full_state` loads on any size.

Not supported yet (refused with the fix): optimizer or parameter offload, fp16 and AMP, the
BF16_Optimizer (bf16 at stage 1 with fp32 gradient accumulation, pipeline bf16), pipeline, tensor,
sequence and expert parallelism, ZeRO++ (quantized weights/gradients, hpZ), MiCS, ZenFlow,
SuperOffload, DeepCompile, elastic and universal checkpoints, ``rso``.

DeepSpeed versions and the internals read
-----------------------------------------
Supported: 0.19.6 to 0.19.8 (``DEEPSPEED_RANGE``), the releases this file's tests pass with;
:func:`initialize` refuses an older release with the fix and warns on a newer one. (0.18.0 and
0.19.0 were tried: 0.18.0 gives other numbers for ZeRO-2 with gradient accumulation and clipping.)
The adapter reads these attributes of DeepSpeed's ZeRO optimizer (``engine.optimizer``) and checks
the layout they describe against its own formula: ``bit16_groups``, ``bit16_groups_flat``,
``single_partition_of_fp32_groups``, ``partition_size``, ``real_dp_process_group``, ``dtype``,
``compute_grad_norm`` and ``check_grad_overflow`` (ZeRO-1/2; 0.19.6 lacks the first, and the
adapter then agrees on skips itself); ``fp16_groups``, ``sub_group_to_group_id``,
``fp32_partitioned_groups_flat``, ``_get_sub_group_process_group`` (ZeRO-3) and each parameter's
``partition_numel()``, ``ds_tensor`` and ``ds_shape``; the engine's ``basic_optimizer``,
``zero_optimization_stage()``, ``seq_dp_world_size`` and ``skipped_steps``; the config's
``float16_config``, ``bfloat16_config``, ``torch_autocast_enabled``, ``managed_gradient_accumulation``
and ``compile_config``; ``deepspeed.runtime.tensor_parallel.init_utils.load_ds_config``; and whether
``deepspeed.runtime.zero.stage3`` has ``is_invalid_grad_norm`` (0.19.8's stage 3 skips non-finite steps).

Non-finite gradients: DeepSpeed computes the global gradient norm and, when it is not finite,
skips the whole step on every rank (measured with DeepSpeed 0.19.8, ZeRO-1/2/3, fp32 and bf16: the
replicas stay identical and equal one process that skips that step). One process without
DeepSpeed skips only the parameters whose gradient is not finite. Where DeepSpeed does not check
(0.19.6's stage 3 in bf16 or fp32), the adapter's own skip flags are agreed over the ranks that hold
each parameter (a max-reduction and a host read per ``step()`` call, which DeepSpeed makes per
parameter group); where it checks, the adapter computes no flag and never waits on the device.

Trust boundary: distopt reads checkpoint files with ``weights_only=True`` (:func:`safe_load` allows
only DeepSpeed's plain-data classes), so a planted file cannot run code through distopt's converter
or :func:`load_full_state`; the converter checks every file before DeepSpeed's ``zero_to_fp32``
reads them. DeepSpeed's own ``engine.load_checkpoint`` (same-size resume) unpickles its files with
``weights_only=False``: resume that way only from checkpoints you trust.
"""

from __future__ import annotations

import copy
import glob
import importlib
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..api import _global_shape, construct, group_of, resolve_class, route
from ..core import comm
from ..core.shard import MatrixShardView, chunk_rows, lpt_owners
from ..optim.base import ADAPTER_KEY, SubspaceOptimizer

logger = logging.getLogger("distopt")

ADAPTER = "deepspeed"
# DeepSpeed releases the adapter is tested with (tests/distributed/test_deepspeed.py, on CPU). Older
# ones are refused before anything is built; newer ones are tried with a warning.
DEEPSPEED_MIN, DEEPSPEED_TESTED_MAX = (0, 19, 6), (0, 19, 8)
DEEPSPEED_RANGE = "deepspeed>=0.19.6,<=0.19.8"
CONFIG_PREFIX = "distopt."
CONFIG_LABEL = CONFIG_PREFIX + "{}"  # how a DeepSpeed config names an optimizer
FULL_FORMAT = "distopt-deepspeed-full"
CONVERT_HINT = ("convert it once with `python -m distopt.deepspeed convert {ckpt} OUT.pt` and resume with "
                "`distopt.deepspeed.load_full_state(engine, 'OUT.pt')` in place of engine.load_checkpoint")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Layout of one parameter's partitions
# ---------------------------------------------------------------------------------------------------
@dataclass
class Partition:
    """Where one parameter's elements lie across the data-parallel ranks, and this rank's share."""

    name: str
    param: torch.Tensor  # the model parameter: the optimizer's state key
    kind: str  # "matrix" or "adamw"
    shape: tuple[int, ...]
    length: int  # elements per rank's partition (S), padding included
    rank: int
    world: int
    group: object  # data-parallel process group, None when one rank holds everything
    device: torch.device
    source: object = None  # (stage, index) of DeepSpeed's buffers holding the fp32 partition

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def bounds(self, k: int) -> tuple[int, int]:
        """Flat range ``[start, end)`` of rank ``k``."""
        start = min(k * self.length, self.numel)
        return start, min(start + self.length, self.numel)

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]

    @property
    def end(self) -> int:
        return self.bounds(self.rank)[1]

    # -- rows (matrices only) ---------------------------------------------------------------------
    def rows(self, k: int) -> tuple[int, int]:
        """Rows owned by rank ``k``: those whose first element it holds."""
        m, n = self.shape
        start, end = self.bounds(k)
        return min(m, _ceil_div(start, n)), min(m, _ceil_div(end, n))

    def head(self, k: int) -> int:
        """Elements at the start of rank ``k``'s range that belong to an earlier rank's last row."""
        n = self.shape[1]
        start, end = self.bounds(k)
        return max(0, min(end, self.rows(k)[0] * n) - start)

    def tail(self, k: int) -> int:
        """Elements of rank ``k``'s last row held by later ranks."""
        r0, r1 = self.rows(k)
        return r1 * self.shape[1] - self.bounds(k)[1] if r1 > r0 else 0

    def owner_of_head(self, k: int) -> int:
        row = self.rows(k)[0] - 1
        return next(j for j in range(self.world) if self.rows(j)[0] <= row < self.rows(j)[1])

    def describe(self) -> dict:
        out = {"kind": self.kind, "shape": list(self.shape), "start": self.start, "end": self.end}
        if self.kind == "matrix":
            out["rows"] = list(self.rows(self.rank))
        return out


@dataclass
class _Plan:
    """Precomputed exchange of one matrix (identical on every rank)."""

    view: MatrixShardView
    head: int  # this rank's head fragment
    own: int  # elements of this rank's rows it holds itself
    tail: int  # elements of its last row held by later ranks
    sources: list[tuple[int, int]]  # (rank, count) filling this rank's tail, in order
    head_owner: int  # rank owning this rank's head fragment (when head > 0)
    head_offset: int  # where that fragment starts in the owner's tail
    max_head: int
    max_tail: int


def _plan(part: Partition, owner: int) -> _Plan:
    m, n = part.shape
    k, world = part.rank, part.world
    r0, r1 = part.rows(k)
    counts = tuple(part.rows(j)[1] - part.rows(j)[0] for j in range(world))
    view = MatrixShardView(name=part.name, global_shape=(m, n), row_start=r0, row_end=r1,
                           group=part.group if world > 1 else None, row_counts=counts, owner=owner,
                           index=k if world > 1 else 0)
    head = part.head(k)
    own = (min(part.end, r1 * n) - r0 * n) if r1 > r0 else 0
    tail = part.tail(k)
    sources = [(i, part.head(i)) for i in range(k + 1, world)
               if part.head(i) > 0 and r1 > r0 and part.owner_of_head(i) == k]
    if sum(c for _, c in sources) != tail:
        raise RuntimeError(f"{part.name}: partition layout does not tile rows (tail {tail}, sources {sources})")
    head_owner, head_offset = (part.owner_of_head(k), part.start - part.bounds(part.owner_of_head(k))[1]) if head else (0, 0)
    max_head = max(part.head(j) for j in range(world))
    max_tail = max(part.tail(j) for j in range(world))
    return _Plan(view, head, own, tail, sources, head_owner, head_offset, max_head, max_tail)


# ---------------------------------------------------------------------------------------------------
# The binding: how the optimizer steps the partitions DeepSpeed hands it
# ---------------------------------------------------------------------------------------------------
class ZeroBinding:
    """Bound to a distopt optimizer by :func:`attach` (``optimizer.bind``): DeepSpeed's side of
    :class:`distopt.optim.base.EngineBinding`."""

    def __init__(self, stage: int, parts: dict[str, Partition], engine=None, finite_checked: bool = False):
        self.stage = stage
        # True when DeepSpeed itself discards a step whose global gradient norm is not finite (ZeRO-1/2
        # unless bf16 runs without check_grad_overflow or without the norm). Then a partition never
        # arrives with NaN/Inf and no collective is spent agreeing on a skip.
        self.finite_checked = finite_checked
        self.parts = parts
        self.by_param = {part.param: part for part in parts.values()}
        self.engine = engine
        self.plans: dict[str, _Plan] = {}
        self._bad: dict[str, bool] = {}  # skip flags of the groups the current step() call takes

    # -- hooks called by SubspaceOptimizer ---------------------------------------------------------
    def state_params(self, group: dict) -> list[torch.Tensor]:
        return [self.parts[group["param_names"][0]].param]

    def state_template(self, p: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like this rank's share (rows x n, or the flat slice) to size state by."""
        part = self.by_param[p]
        if part.kind == "matrix":
            r0, r1 = part.rows(part.rank)
            return torch.empty((r1 - r0, part.shape[1]), dtype=torch.float32, device=part.device)
        return torch.empty((part.end - part.start,), dtype=torch.float32, device=part.device)

    def describe(self, optimizer: SubspaceOptimizer) -> dict:
        layout = {}
        for group in optimizer.param_groups:
            part = self.parts[group["param_names"][0]]
            entry = part.describe()
            if part.kind == "matrix":  # state split by the matrix's rows, and split in rank chunks
                entry["row_keys"] = sorted(optimizer.row_sharded_keys(part.param, group))
                chunked = optimizer.chunked_state(part.param, group)
                entry["chunk_keys"] = sorted(chunked)
                entry["chunk_dims"] = {key: dim for key, (_, dim) in sorted(chunked.items())}
            layout[part.name] = entry
        world = next(iter(self.parts.values())).world if self.parts else 1
        rank = next(iter(self.parts.values())).rank if self.parts else 0
        return {"adapter": ADAPTER, "stage": self.stage, "dp_world_size": world, "dp_rank": rank, "layout": layout}

    def check_state_dict(self, optimizer: SubspaceOptimizer, state_dict: dict) -> None:
        saved = state_dict["distopt"].get("engine")
        if saved is None or saved.get("full"):
            return  # whole tensors: import_value takes this rank's rows or elements
        world = next(iter(self.parts.values())).world
        if saved.get("dp_world_size") != world:
            raise ValueError(
                f"this optimizer state was saved by {saved.get('dp_world_size')} data-parallel ranks and this run has "
                f"{world}: ZeRO partitions (and the row blocks built from them) differ between sizes. Fix: "
                + CONVERT_HINT.format(ckpt="CHECKPOINT_DIR")
            )
        for name, entry in saved["layout"].items():
            part = self.parts.get(name)
            if part is not None and (entry["start"], entry["end"]) != (part.start, part.end):
                raise ValueError(
                    f"{name}: saved partition [{entry['start']}, {entry['end']}) differs from this run's "
                    f"[{part.start}, {part.end}) (another ZeRO stage or DeepSpeed version?). Fix: "
                    + CONVERT_HINT.format(ckpt="CHECKPOINT_DIR")
                )

    def import_value(self, optimizer, p: torch.Tensor, group: dict, key: str, value: torch.Tensor) -> torch.Tensor:
        target = optimizer.state[p][key]
        if tuple(value.shape) == tuple(target.shape):
            return value
        part = self.by_param[p]
        if part.kind == "adamw" and value.numel() == part.numel:
            return value.reshape(-1)[part.start:part.end]
        if part.kind == "matrix" and key in optimizer.row_sharded_keys(p, group) and value.shape[0] == part.shape[0]:
            r0, r1 = part.rows(part.rank)
            return value[r0:r1]
        chunked = optimizer.chunked_state(p, group) if part.kind == "matrix" else {}
        if key in chunked and tuple(value.shape) == tuple(chunked[key][0]):
            dim = chunked[key][1]
            counts = chunk_rows(value.shape[dim], part.world)
            return value.narrow(dim, sum(counts[: part.rank]), counts[part.rank])
        return value  # the caller reports the shape mismatch

    # -- the step ------------------------------------------------------------------------------------
    def begin_step(self, groups: list[dict]) -> None:
        """Decide, for every group this ``step()`` call takes, whether its gradient is finite. Where
        DeepSpeed checked already, nothing is computed and the host never waits; otherwise one flag
        per group, one max-reduction per process group and one host read per call (DeepSpeed calls
        ``step()`` once per parameter group, and distopt gives each parameter its own)."""
        self._bad = {}
        todo = []
        for group in groups:
            if group["params"] and group["params"][0].grad is not None:
                part = self.parts[group["param_names"][0]]
                todo.append((part, group["params"][0].grad.detach().view(-1)[: part.end - part.start]))
        if self.finite_checked:  # a non-finite step never reaches the optimizer
            self._bad = {part.name: False for part, _ in todo}
            return
        if not todo:
            return
        flags = torch.stack([(~torch.isfinite(g).all()).float() if g.numel() else g.new_zeros((), dtype=torch.float32)
                             for _, g in todo])
        by_group: dict[int, list[int]] = {}  # every holder of a part decides alike
        for i, (part, _) in enumerate(todo):
            if part.group is not None:
                by_group.setdefault(id(part.group), []).append(i)
        for indices in by_group.values():
            picked = flags[indices]
            comm.all_reduce_max(picked, todo[indices[0]][0].group)
            flags[indices] = picked
        self._bad = {part.name: bool(bad) for (part, _), bad in zip(todo, flags.tolist())}

    def _is_bad(self, part: Partition) -> bool:
        """The flag :meth:`begin_step` decided for this group in this ``step()`` call."""
        return self._bad.pop(part.name)

    def step_group(self, optimizer: SubspaceOptimizer, group: dict) -> None:
        if not group["params"]:
            return  # ZeRO-3 steps one sub-group per call; the others are empty
        part = self.parts[group["param_names"][0]]
        flat = group["params"][0]
        if flat.grad is None:
            if part.world > 1:
                raise RuntimeError(f"{part.name}: DeepSpeed handed over a partition without a gradient")
            return
        values, grads = flat.detach().view(-1), flat.grad.detach().view(-1)
        if part.kind == "adamw":
            self._adamw(optimizer, group, part, values, grads)
        else:
            self._matrix(optimizer, group, part, values, grads)

    def _adamw(self, optimizer, group, part: Partition, values, grads) -> None:
        size = part.end - part.start
        param, grad = values[:size], grads[:size]
        if self._is_bad(part):
            optimizer.record_nonfinite_skip(part.name)
            return
        optimizer.step_elementwise(group, [param], [grad], [optimizer.state[part.param]])

    def _matrix(self, optimizer, group, part: Partition, values, grads) -> None:
        plan = self.plans[part.name]
        n = part.shape[1]
        group_pg = part.group if part.world > 1 else None
        if self._is_bad(part):  # every rank holding part of the matrix skips it together
            optimizer.record_nonfinite_skip(part.name)
            return
        L = plan.max_head
        gathered = None
        if L:  # rows that start on another rank's partition travel to this row block's owner
            buf = values.new_zeros(2 * L, dtype=torch.float32)
            buf[: plan.head] = values[: plan.head]
            buf[L : L + plan.head] = grads[: plan.head]
            gathered = comm.all_gather_stacked(buf, group_pg)
        rows = plan.view.local_rows
        own = slice(plan.head, plan.head + plan.own)
        if plan.tail == 0:  # this rank holds all of its rows: step in place
            p_rows = values[own].view(rows, n)
            g_rows = grads[own].view(rows, n)
        else:
            p_rows = torch.cat([values[own]] + [gathered[i, :c].to(values.dtype) for i, c in plan.sources]).view(rows, n)
            g_rows = torch.cat([grads[own]] + [gathered[i, L : L + c].to(grads.dtype) for i, c in plan.sources]).view(rows, n)
        optimizer.step_matrix(p_rows, g_rows, optimizer.state[part.param], group, plan.view)
        if plan.tail:
            values[own].copy_(p_rows.view(-1)[: plan.own])
        if plan.max_tail:  # send each tail's new values back to the ranks holding them
            out = values.new_zeros(plan.max_tail, dtype=torch.float32)
            if plan.tail:
                out[: plan.tail] = p_rows.view(-1)[plan.own : plan.own + plan.tail]
            back = comm.all_gather_stacked(out, group_pg)
            if plan.head:
                values[: plan.head].copy_(back[plan.head_owner, plan.head_offset : plan.head_offset + plan.head])

    # -- whole weights (load_full_state) ------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, engine, weights: dict[str, torch.Tensor]) -> None:
        """Set fp32 master partitions and the model's working copies from full fp32 tensors."""
        zopt = engine.optimizer
        missing = sorted(set(self.parts) - set(weights))
        if missing:
            raise ValueError(f"the converted checkpoint has no weights for {missing[:5]}")
        for part in self.parts.values():
            full = weights[part.name].to(torch.float32).reshape(-1)
            if full.numel() != part.numel:
                raise ValueError(f"{part.name}: converted weight has {full.numel()} elements, the model {part.numel}")
            piece = full[part.start : part.end].to(part.device)
            stage, index = part.source
            p = part.param
            if stage in (1, 2):
                zopt.single_partition_of_fp32_groups[index].data[: piece.numel()].copy_(piece)
                p.data.copy_(full.view(p.shape).to(p.dtype))
            elif stage == 3:
                zopt.fp32_partitioned_groups_flat[index].data[: piece.numel()].copy_(piece)
                p.ds_tensor.data[: piece.numel()].copy_(piece.to(p.ds_tensor.dtype))
                if p.data.numel() == part.numel:  # a persistent (never released) parameter
                    p.data.copy_(full.view(p.data.shape).to(p.dtype))
            else:
                p.data.copy_(full.view(p.shape).to(p.dtype))
                master = index  # the fp32 copy a stage-0 wrapper keeps, or the parameter itself
                if master is not None and master is not p:
                    master.data.copy_(full.view(master.shape))
        # Frozen parameters are not in the optimizer: copy them too when the file has them.
        for name, p in engine.module.named_parameters():
            if p.requires_grad or name not in weights:
                continue
            full = weights[name].reshape(-1)
            if hasattr(p, "ds_tensor") and p.data.numel() != full.numel():
                size = p.ds_tensor.numel()
                rank = dist.get_rank(getattr(p, "ds_process_group", None))
                piece = full[rank * size : min((rank + 1) * size, full.numel())]
                p.ds_tensor.data[: piece.numel()].copy_(piece.to(p.ds_tensor.dtype))
            else:
                p.data.copy_(full.view(p.data.shape).to(p.dtype))


def _group_rank(group) -> tuple[int, int]:
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def attach(engine, optimizer: SubspaceOptimizer) -> ZeroBinding:
    """Read DeepSpeed's partition layout for every group of ``optimizer`` and bind the adapter."""
    zopt = engine.optimizer
    wrapper = type(zopt).__name__
    groups = optimizer.param_groups
    parts: dict[str, Partition] = {}

    def part_for(group, length, rank, world, pg, device, source):
        name = group["param_names"][0]
        p = optimizer.parameter(name)
        shape = tuple(_global_shape(p))
        parts[name] = Partition(name=name, param=p, kind=group["kind"], shape=shape, length=length, rank=rank,
                                world=world, group=pg if world > 1 else None, device=device, source=source)
        return parts[name]

    if zopt is optimizer:  # stage 0 in fp32: whole tensors on every rank
        stage = 0
        for group in groups:
            held = group["params"][0]
            part = part_for(group, math.prod(_global_shape(optimizer.parameter(group["param_names"][0]))),
                            0, 1, None, held.device, (0, held))
            if held.numel() != part.numel:
                raise RuntimeError(f"{part.name}: stage 0 handed over {tuple(held.shape)}, expected {part.shape}")
    elif wrapper == "DeepSpeedZeroOptimizer":
        stage = int(engine.zero_optimization_stage())
        for i, group in enumerate(groups):
            bit16 = zopt.bit16_groups[i]
            p = optimizer.parameter(group["param_names"][0])
            if len(bit16) != 1 or bit16[0] is not p:
                raise RuntimeError(f"DeepSpeed regrouped parameters (group {i} holds {len(bit16)}); distopt needs one per group")
            flat = zopt.single_partition_of_fp32_groups[i]
            if group["params"][0] is not flat:
                raise RuntimeError(f"group {i}: the optimizer does not hold DeepSpeed's fp32 partition")
            rank, world = _group_rank(zopt.real_dp_process_group[i])
            part = part_for(group, int(zopt.partition_size[i]), rank, world, zopt.real_dp_process_group[i],
                            flat.device, (stage, i))
            if flat.numel() != part.length or zopt.bit16_groups_flat[i].numel() != part.length * world:
                raise RuntimeError(f"{part.name}: ZeRO-{stage} partition is {flat.numel()} elements, expected {part.length}")
    elif wrapper == "DeepSpeedZeroOptimizer_Stage3":
        stage = 3
        seen = set()
        for s, params in enumerate(zopt.fp16_groups):
            gid = zopt.sub_group_to_group_id[s]
            group = groups[gid]
            p = optimizer.parameter(group["param_names"][0])
            if len(params) != 1 or params[0] is not p or gid in seen:
                raise RuntimeError(f"ZeRO-3 sub-group {s} does not hold exactly group {gid}'s parameter")
            seen.add(gid)
            pg = zopt._get_sub_group_process_group(s)
            rank, world = _group_rank(pg)
            flat = zopt.fp32_partitioned_groups_flat[s]
            part = part_for(group, int(p.partition_numel()), rank, world, pg, flat.device, (3, s))
            if flat.numel() != part.length or part.length != _ceil_div(part.numel, world):
                raise RuntimeError(f"{part.name}: ZeRO-3 partition is {flat.numel()} elements, expected {part.length}")
        if len(seen) != len(groups):
            raise RuntimeError("some parameter groups have no ZeRO-3 sub-group")
    else:
        raise NotImplementedError(
            f"DeepSpeed wrapped the optimizer in {wrapper}, which distopt does not support yet. Use ZeRO stage 1, 2 or "
            "3 (or stage 0 in fp32) with bf16 or fp32, without offload."
        )
    if stage == 3:
        # Stage 3 discards a step whose global gradient norm is not finite from 0.19.8 on (its
        # is_invalid_grad_norm); older releases hand bf16/fp32 NaN over, and the ranks then agree on
        # skips themselves (one max-reduction per step() call, which DeepSpeed makes per sub-group).
        from deepspeed.runtime.zero import stage3

        finite_checked = hasattr(stage3, "is_invalid_grad_norm")
    elif stage in (1, 2):
        # Releases without these switches (0.19.6) are not trusted to check: the adapter agrees on skips itself.
        norm, overflow = getattr(zopt, "compute_grad_norm", None), getattr(zopt, "check_grad_overflow", None)
        finite_checked = norm is not None and overflow is not None and bool(norm) and (zopt.dtype != torch.bfloat16 or bool(overflow))
    else:
        finite_checked = False
    binding = ZeroBinding(stage, parts, engine, finite_checked)
    matrices = [part for part in parts.values() if part.kind == "matrix"]
    owners = lpt_owners({p.name: p.shape[0] * p.shape[1] * min(p.shape) for p in matrices}, matrices[0].world) if matrices else {}
    for part in matrices:
        binding.plans[part.name] = _plan(part, owners[part.name] if part.world > 1 else 0)
    optimizer.bind(binding, {part.param: binding.plans[part.name].view for part in matrices})
    return binding


# ---------------------------------------------------------------------------------------------------
# Building the optimizer: one group per parameter
# ---------------------------------------------------------------------------------------------------
def build_partitioned_optimizer(model: torch.nn.Module, name: str, *, rules=None, use_default_rules: bool = True,
                                elementwise: dict | None = None, **hparams) -> SubspaceOptimizer:
    """Optimizer ``name`` over ``model`` with one parameter group per trainable parameter, routed as
    :func:`distopt.build_optimizer` routes them (:func:`distopt.api.route`)."""
    resolve_class(name, label=CONFIG_LABEL)
    if name == "rso":  # before routing: RSO's prepare_model would already have rewritten the model
        raise NotImplementedError(
            "distopt.rso replaces linear layers by reparametrized ones and merges them into the weights, which "
            "DeepSpeed's flattened and partitioned parameters do not allow yet. Fix: train RSO with DDP or FSDP2 "
            "(distopt.build_optimizer), or choose another distopt optimizer in the config."
        )
    cls, hparams, routed = route(model, name, hparams, rules=rules, use_default_rules=use_default_rules,
                                 elementwise=elementwise, label=CONFIG_LABEL)
    groups = [{**group_of([r], r.kind, elementwise), ADAPTER_KEY: ADAPTER} for r in routed]
    return construct(cls, f"distopt.{name}", groups, hparams)


# ---------------------------------------------------------------------------------------------------
# Config handling and what is refused
# ---------------------------------------------------------------------------------------------------
def _load_config(config):
    if isinstance(config, dict):
        return copy.deepcopy(config)
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return copy.deepcopy(load_ds_config(config))


def split_optimizer_config(config: dict) -> tuple[str, dict, dict] | None:
    """``(name, params, config without "optimizer")`` when the config names a distopt optimizer."""
    spec = config.get("optimizer")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return None
    kind = spec["type"]
    if not kind.lower().startswith(CONFIG_PREFIX):
        return None
    name = kind[len(CONFIG_PREFIX):].lower().replace("_", "-")
    params = dict(spec.get("params") or {})
    rest = {k: v for k, v in config.items() if k != "optimizer"}
    return name, params, rest


def check_supported(ds_config, raw: dict, model: torch.nn.Module, mpu=None, mesh_param=None) -> None:
    """Raise on every DeepSpeed feature the adapter does not handle yet, with the fix."""
    zero = ds_config.zero_config
    stage = int(ds_config.zero_optimization_stage) if ds_config.zero_enabled else 0
    zraw = raw.get("zero_optimization") or {}

    def device_of(offload):
        device = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(device, "value", device) or "none").lower()

    if device_of(getattr(zero, "offload_optimizer", None)) not in ("none", ""):
        raise ValueError(
            "zero_optimization.offload_optimizer is set: optimizer offload runs the step on the host over DeepSpeed's "
            "CPU Adam partitions, and distopt's matrix step is not wired into it. Fix: remove offload_optimizer "
            "(distopt's low-rank state is already a fraction of Adam's), or use DeepSpeed's own AdamW for offload."
        )
    if device_of(getattr(zero, "offload_param", None)) not in ("none", ""):
        raise NotImplementedError(
            "zero_optimization.offload_param is not supported with distopt optimizers yet. Fix: remove offload_param."
        )
    for key in ("zenflow", "super_offload"):
        if zraw.get(key):
            raise NotImplementedError(f"zero_optimization.{key} is not supported with distopt optimizers. Fix: remove it.")
    if ds_config.float16_config.enabled or (raw.get("amp") or {}).get("enabled"):
        raise NotImplementedError(
            "fp16/AMP training is not supported with distopt optimizers yet. Fix: use \"bf16\": {\"enabled\": true} "
            "(or fp32)."
        )
    if getattr(ds_config, "torch_autocast_enabled", False):
        raise NotImplementedError("torch_autocast is not supported with distopt optimizers yet. Fix: use \"bf16\".")
    bf16 = ds_config.bfloat16_config
    if bf16.enabled:
        accum = ds_config.grad_accum_dtype
        if stage == 1 and accum is not None and str(accum).lower() in ("fp32", "float32", "torch.float32"):
            raise NotImplementedError(
                "bf16 with ZeRO stage 1 and data_types.grad_accum_dtype=fp32 makes DeepSpeed use its BF16_Optimizer, "
                "which distopt does not support. Fix: drop grad_accum_dtype (or set it to \"bf16\") so stage 1 runs "
                "the ZeRO optimizer, or use ZeRO stage 2 or 3."
            )
        if stage == 0:
            raise NotImplementedError(
                "bf16 without ZeRO makes DeepSpeed wrap the optimizer in its BF16/FP16 wrappers, which distopt does "
                "not support. Fix: use ZeRO stage 1, 2 or 3 with bf16, or stage 0 in fp32."
            )
        for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
            if getattr(bf16, key, False):
                raise NotImplementedError(f"bf16.{key} is not supported with distopt optimizers. Fix: remove it "
                                          "(distopt keeps fp32 master weights and fp32 state).")
    if zraw.get("fp16_master_weights_and_gradients"):
        raise NotImplementedError("fp16_master_weights_and_gradients is not supported. Fix: remove it.")
    if stage in (1, 2) and getattr(zero, "elastic_checkpoint", False):
        raise NotImplementedError(
            "zero_optimization.elastic_checkpoint re-cuts optimizer state as if it were element-wise, which would "
            "corrupt distopt's low-rank state. Fix: remove it; to resume on another data-parallel size use "
            "`python -m distopt.deepspeed convert` and distopt.deepspeed.load_full_state."
        )
    if ds_config.load_universal_checkpoint:
        raise NotImplementedError(
            "universal checkpoints hard-code Adam's element-wise state and cannot hold distopt's. Fix: remove "
            "checkpoint.load_universal; to resume on another data-parallel size use `python -m distopt.deepspeed "
            "convert` and distopt.deepspeed.load_full_state."
        )
    zeropp = {"zero_quantized_weights": getattr(zero, "zero_quantized_weights", False),
              "zero_quantized_nontrainable_weights": getattr(zero, "zero_quantized_nontrainable_weights", False),
              "zero_quantized_gradients": getattr(zero, "zero_quantized_gradients", False),
              "zero_hpz_partition_size": (getattr(zero, "zero_hpz_partition_size", 1) or 1) > 1}
    used = [k for k, v in zeropp.items() if v]
    if used:
        raise NotImplementedError(
            f"ZeRO++ ({', '.join(used)}) is not supported with distopt optimizers yet: quantized weights and "
            "gradients or secondary partitions change what the optimizer receives. Fix: remove these keys."
        )
    if (getattr(zero, "mics_shard_size", -1) or -1) > 0:
        raise NotImplementedError("MiCS (mics_shard_size) is not supported with distopt optimizers. Fix: remove it.")
    if getattr(ds_config.compile_config, "deepcompile", False):
        raise NotImplementedError("compile.deepcompile is not supported with distopt optimizers. Fix: remove it.")
    if not getattr(ds_config, "managed_gradient_accumulation", True):
        raise NotImplementedError(
            "managed_gradient_accumulation=false is not supported with distopt optimizers yet. Fix: remove it.")
    if ds_config.hybrid_engine.enabled:
        raise NotImplementedError("the hybrid engine is not supported with distopt optimizers. Fix: disable it.")
    from deepspeed.pipe import PipelineModule

    if isinstance(model, PipelineModule):
        raise NotImplementedError(
            "pipeline parallelism (PipelineModule) is not supported with distopt optimizers yet: the pipeline "
            "engine and its BF16_Optimizer hand the optimizer per-stage flat buffers. Fix: train the plain "
            "nn.Module with ZeRO stage 1, 2 or 3."
        )
    from deepspeed.moe.utils import has_moe_layers

    if has_moe_layers(model)[0]:
        raise NotImplementedError("MoE layers (expert parallelism) are not supported with distopt optimizers yet.")
    tp = ds_config.tensor_parallel_config
    if mpu is not None or (getattr(tp, "autotp_size", 0) or 0) > 1 or mesh_param is not None \
            or "sequence_parallel_size" in raw:
        raise NotImplementedError(
            "tensor, sequence or model parallelism (mpu, autotp_size, mesh_param, sequence_parallel_size) is not "
            "supported with distopt optimizers yet: each rank's matrices would be slices of the true weights. Fix: "
            "use data parallelism with ZeRO only."
        )


def _check_model_parameters(model, model_parameters) -> None:
    if model_parameters is None:
        return
    given = []
    for item in model_parameters:
        if isinstance(item, dict):
            extra = sorted(set(item) - {"params"})
            if extra:
                raise ValueError(
                    f"model_parameters groups carry {extra}: distopt builds its own parameter groups from the model. "
                    "Set hyper-parameters in the config's optimizer.params (\"elementwise\" for the AdamW-stepped "
                    "parameters, \"rules\" to route parameters by name)."
                )
            given.extend(item["params"])
        else:
            given.append(item)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if {id(p) for p in given} != trainable:
        raise ValueError(
            "model_parameters must be the model's trainable parameters: distopt routes every trainable parameter "
            "of the model. To leave a parameter out, set requires_grad=False on it."
        )


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed older than the adapter supports (its ZeRO internals or results differ);
    warn once on one newer than it was tested with."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    from packaging.version import Version  # a dependency of DeepSpeed

    release = Version(version).release
    if release < DEEPSPEED_MIN:
        raise RuntimeError(
            f"DeepSpeed {version} is older than distopt's ZeRO adapter supports ({DEEPSPEED_RANGE}). Fix: pip install "
            f"\"{DEEPSPEED_RANGE}\" (with DS_BUILD_OPS=0 and --no-build-isolation for the source build)."
        )
    if release > DEEPSPEED_TESTED_MAX and not check_deepspeed_version.warned:
        check_deepspeed_version.warned = True
        logger.warning("DeepSpeed %s is newer than distopt's adapter was tested with (%s); the adapter checks the "
                       "partition layout it reads and fails loudly if it changed", version, DEEPSPEED_RANGE)


check_deepspeed_version.warned = False


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None):
    """``deepspeed.initialize`` that understands ``"optimizer": {"type": "distopt.<name>", "params": {...}}``.

    Returns the same ``(engine, optimizer, training_dataloader, lr_scheduler)`` tuple. With any other
    optimizer in the config (or a client ``optimizer``) the call is passed to ``deepspeed.initialize``
    unchanged. ``params`` are the optimizer's keyword arguments, plus ``rules`` (list of
    ``[regex, role]``), ``use_default_rules`` and ``elementwise`` (hyper-parameters of the AdamW-stepped
    parameters), as in :func:`distopt.build_optimizer`. The config's ``scheduler`` drives every group.
    """
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    if model is None:
        raise ValueError("distopt.deepspeed.initialize requires a model")
    port = TORCH_DISTRIBUTED_DEFAULT_PORT if distributed_port is None else distributed_port
    if config is None and config_params is not None:
        config = config_params
    from_args = None
    for key in ("deepspeed_config", "deepscale_config"):
        if getattr(args, key, None) is not None:
            if config is not None:
                raise ValueError("a DeepSpeed config was given both in args.deepspeed_config and as config=; pass one")
            from_args = config = getattr(args, key)
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass config=<path or dict> or --deepspeed_config <file>")
    passthrough = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=port, mpu=mpu,
                       dist_init_required=dist_init_required, collate_fn=collate_fn, mesh_param=mesh_param)
    loaded = _load_config(config)
    split = split_optimizer_config(loaded)
    if split is None:
        if isinstance(optimizer, SubspaceOptimizer):
            raise ValueError(
                "a distopt optimizer instance was passed to DeepSpeed: ZeRO would flatten its groups into slices "
                "that span several matrices. Fix: name it in the config instead, "
                "\"optimizer\": {\"type\": \"distopt.<name>\", \"params\": {...}}."
            )
        return deepspeed.initialize(config=None if from_args else config, **passthrough)
    name, params, rest = split
    if optimizer is not None:
        raise ValueError("the config names a distopt optimizer and optimizer= was passed too; use one of them")
    _check_model_parameters(model, model_parameters)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), distributed_port=port,
                               dist_init_required=dist_init_required)
    from deepspeed.runtime.config import DeepSpeedConfig

    check_supported(DeepSpeedConfig(copy.deepcopy(rest), mpu), rest, model, mpu, mesh_param)
    rest["zero_allow_untested_optimizer"] = True  # distopt steps ZeRO's partitions through this adapter
    build_args = {k: params.pop(k) for k in ("rules", "use_default_rules", "elementwise") if k in params}
    opt = build_partitioned_optimizer(model, name, **build_args, **params)
    if args is not None and from_args is not None:
        args = copy.copy(args)
        for key in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, key):
                setattr(args, key, None)
    passthrough.update(args=args, optimizer=opt, model_parameters=None)
    engine, zopt, loader, scheduler = deepspeed.initialize(config=rest, **passthrough)
    attach(engine, opt)
    _guard_checkpoint_loading(engine)
    logger.info("distopt.%s under DeepSpeed ZeRO-%d: %d groups", name, opt.binding.stage, len(opt.param_groups))
    return engine, zopt, loader, scheduler


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _resolve_tag(load_dir: str, tag) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{load_dir}: no 'latest' file; pass the checkpoint tag")
    with open(latest) as f:
        return f.read().strip()


def saved_dp_world_size(load_dir: str, tag=None) -> int:
    """Data-parallel size a DeepSpeed checkpoint was written with (its per-rank optimizer files)."""
    folder = os.path.join(load_dir, _resolve_tag(load_dir, tag))
    ranks = {int(m.group(1)) for f in glob.glob(os.path.join(folder, "*optim_states.pt"))
             if (m := _OPTIM_FILE.search(os.path.basename(f)))}
    if not ranks:
        raise FileNotFoundError(f"{folder}: no ZeRO optimizer files (*zero_pp_rank_*_mp_rank_00_optim_states.pt)")
    return max(ranks) + 1


def _guard_checkpoint_loading(engine) -> None:
    """Wrap ``engine.load_checkpoint`` so a checkpoint of another data-parallel size is refused
    before anything is loaded, with the conversion that makes it work."""
    import inspect

    original = engine.load_checkpoint
    signature = inspect.signature(original)

    def load_checkpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        load_dir, tag = bound.arguments["load_dir"], bound.arguments["tag"]
        with_optimizer = bound.arguments["load_optimizer_states"] and not bound.arguments["load_module_only"]
        if with_optimizer and (tag is not None or os.path.isfile(os.path.join(load_dir, "latest"))):
            saved = saved_dp_world_size(load_dir, tag)
            current = engine.seq_dp_world_size
            if saved != current:
                raise ValueError(
                    f"checkpoint {load_dir} (tag {_resolve_tag(load_dir, tag)}) was written by {saved} data-parallel "
                    f"ranks and this run has {current}. ZeRO partitions, and distopt's row-sharded state, do not "
                    "carry over between sizes. Fix: " + CONVERT_HINT.format(ckpt=load_dir)
                )
        return original(*args, **kwargs)

    load_checkpoint.__doc__ = original.__doc__
    engine.load_checkpoint = load_checkpoint


def _distopt_state(optim_file_state: dict) -> dict:
    inner = optim_file_state["optimizer_state_dict"]
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        value = inner.get(key)
        if isinstance(value, dict) and "distopt" in value:
            return value
    raise ValueError("this ZeRO checkpoint does not hold a distopt optimizer state (was it written by "
                     "distopt.deepspeed.initialize?)")


def _model_states_file(folder: str) -> str:
    for pattern in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(folder, pattern)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no model states file")


def merge_states(states: list[dict]) -> dict:
    """One name-keyed optimizer state with whole tensors from every rank's distopt state dict."""
    metas = [s["distopt"]["engine"] for s in states]
    order = sorted(range(len(states)), key=lambda i: metas[i]["dp_rank"])
    states = [states[i] for i in order]
    metas = [metas[i] for i in order]
    if [m["dp_rank"] for m in metas] != list(range(len(states))) or metas[0]["dp_world_size"] != len(states):
        raise ValueError(f"need the optimizer state of every rank 0..{metas[0]['dp_world_size'] - 1}, got ranks "
                         f"{[m['dp_rank'] for m in metas]}")
    full = {}
    for name, lay in metas[0]["layout"].items():
        entries = {}
        for key, first in states[0]["state"][name].items():
            pieces = [s["state"][name][key] for s in states]
            if lay["kind"] == "adamw" and first.dim() >= 1:
                flat = torch.cat([p.reshape(-1) for p in pieces])
                entries[key] = flat.reshape(lay["shape"])
            elif lay["kind"] == "matrix" and key in lay["row_keys"]:
                entries[key] = torch.cat(pieces, dim=0)
                if entries[key].shape[0] != lay["shape"][0]:
                    raise ValueError(f"{name}.{key}: row blocks add up to {entries[key].shape[0]} rows, not {lay['shape'][0]}")
            elif lay["kind"] == "matrix" and key in lay.get("chunk_keys", ()):  # per-rank chunks, in rank order
                entries[key] = torch.cat(pieces, dim=lay.get("chunk_dims", {}).get(key, 0))
            else:
                entries[key] = first.clone()
        full[name] = entries
    meta = dict(states[0]["distopt"])
    meta["engine"] = {"adapter": ADAPTER, "full": True, "source_dp_world_size": len(states),
                      "source_stage": metas[0]["stage"]}
    return {"state": full, "param_groups": states[0]["param_groups"], "distopt": meta}


# Plain data holders DeepSpeed pickles into its checkpoint files: allowed when loading them with
# ``weights_only=True``. Anything else in a file is refused by name, never unpickled.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def safe_load(path: str, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` that also accepts DeepSpeed's own plain-data classes
    (:data:`DEEPSPEED_SAFE_GLOBALS`). A file holding any other object is refused, naming it.
    ``mmap=True`` maps the tensors from the file instead of reading them into memory."""
    allowed = [c for c in map(_resolve, DEEPSPEED_SAFE_GLOBALS) if c is not None]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            others = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(DEEPSPEED_SAFE_GLOBALS))
            raise ValueError(
                f"{path} holds objects of {others or 'unknown classes'}, which distopt does not unpickle: it loads "
                "checkpoint files with weights_only=True, so that a file cannot run code. If you trust this file and "
                "these classes are plain data, add them with torch.serialization.add_safe_globals([...]) and retry"
            ) from None


def convert_checkpoint(load_dir: str, out: str, tag=None) -> str:
    """Write one file with everything needed to resume a distopt DeepSpeed checkpoint on any
    data-parallel size: fp32 weights by name, the whole optimizer state by name, the LR scheduler,
    the engine's step counters and the client state. Load it with :func:`load_full_state`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _resolve_tag(load_dir, tag)
    folder = os.path.join(load_dir, tag)
    world = saved_dp_world_size(load_dir, tag)
    states = []
    for rank in range(world):
        matches = [f for f in glob.glob(os.path.join(folder, f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))]
        if len(matches) != 1:
            raise FileNotFoundError(f"{folder}: expected one optimizer file of rank {rank}, found {matches}")
        states.append(_distopt_state(safe_load(matches[0])))
    optimizer = merge_states(states)
    # Every file DeepSpeed's zero_to_fp32 unpickles has now passed a weights_only load here.
    model_states = safe_load(_model_states_file(folder))
    weights = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    weights = {k: v.detach().clone().float() for k, v in weights.items()}
    engine_keys = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
    known = set(engine_keys) | {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                                "shared_params", "frozen_param_fragments", "dp_world_size", "mp_world_size",
                                "ds_config", "ds_version", "data_sampler", "random_ltd", "sparse_tensor_module_names"}
    blob = {
        "format": FULL_FORMAT, "version": 1, "tag": tag, "source_dp_world_size": world,
        "model": weights, "optimizer": optimizer,
        "engine": {k: model_states.get(k) for k in engine_keys},
        "client_state": {k: v for k, v in model_states.items() if k not in known},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out)
    return out


def load_full_state(engine, path: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True) -> dict:
    """Resume from a file written by :func:`convert_checkpoint`, on any data-parallel size.

    Sets this rank's fp32 master partitions and the model's working weights, this rank's rows and
    elements of the optimizer state, the LR scheduler and the engine's step counters. Returns the
    client state saved with the checkpoint. The file is memory-mapped: each rank reads its share,
    so the ranks of a node do not each hold the whole merged state in host memory."""
    blob = safe_load(path, mmap=True)
    if blob.get("format") != FULL_FORMAT:
        raise ValueError(f"{path} was not written by `python -m distopt.deepspeed convert`")
    optimizer = engine.basic_optimizer
    binding = getattr(optimizer, "binding", None)
    if binding is None:
        raise ValueError("this engine was not built by distopt.deepspeed.initialize")
    binding.load_weights(engine, blob["model"])
    if load_optimizer_states:
        optimizer.load_state_dict(blob["optimizer"])
    state = blob["engine"]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if state.get(key) is not None:
            setattr(engine, key, state[key])
    return blob["client_state"]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distopt.deepspeed",
                                     description="Tools for distopt optimizers under DeepSpeed ZeRO.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="merge a ZeRO checkpoint into one file loadable on any data-parallel size")
    conv.add_argument("checkpoint", help="the directory given to engine.save_checkpoint")
    conv.add_argument("out", help="output file (.pt)")
    conv.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = parser.parse_args(argv)
    if args.command == "convert":
        out = convert_checkpoint(args.checkpoint, args.out, args.tag)
        print(f"wrote {out}; resume with distopt.deepspeed.load_full_state(engine, {out!r})")
    return 0
