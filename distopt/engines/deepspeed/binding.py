"""The binding through which a distopt optimizer steps the partitions DeepSpeed hands it, and the
builder of its one-group-per-parameter optimizer."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.distributed as dist

from ...api import _global_shape, construct, group_of, resolve_class, route
from ...core import comm
from ...core.shard import chunk_rows, lpt_owners
from ...optim.base import ADAPTER_KEY, SubspaceOptimizer
from .layout import Partition, _ceil_div, _Plan, _plan
from .names import ADAPTER, CONFIG_LABEL, CONVERT_HINT

_UNREAD = 2.0  # a flag of a gradient not read ahead (a max-reduction keeps it above 0 and 1)


def _flag(part: Partition, tensors: list[torch.Tensor] | None) -> torch.Tensor:
    """1.0 if this rank's share of ``part``'s gradient holds NaN or Inf, else 0.0; ``_UNREAD`` when
    ``tensors`` is ``None``."""
    if tensors is None:
        return torch.tensor(_UNREAD, device=part.device)
    filled = [t for t in tensors if t.numel()]
    if not filled:
        return torch.zeros((), dtype=torch.float32, device=part.device)
    extremes = torch.stack([torch.stack(t.detach().aminmax()).float() for t in filled])  # NaN propagates; no temporary
    return (~torch.isfinite(extremes)).any().float().to(part.device)


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
        # Flags of the engine step's later groups, decided at its first step() call (_UNREAD: decide
        # at the group's own call), and the engine step they belong to.
        self._ahead: dict[str, float] = {}
        self._ahead_step: object = None
        self._norm_groups: list | None = None  # ZeRO-3's per-sub-group norms of this step (watch_norm_groups)
        self._sub_group_names: list[str] = []  # the part each of those norms belongs to, in sub-group order

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
        DeepSpeed checked already, nothing is computed and the host never waits. Otherwise DeepSpeed
        calls ``step()`` once per parameter group (distopt gives each parameter its own), so under
        ZeRO-1/2 the first call of an engine step decides every group at once: this call's gradients,
        and the later groups' still in DeepSpeed's ``averaged_gradients`` (DeepSpeed's clipping keeps
        a partition's finiteness: the scale is finite, or zero only when some partition is not
        finite). One max-reduction per process group and one host read per engine step; later calls
        read the decisions made. A group whose gradient could not be read ahead is decided at its own
        call.

        ZeRO-3 (0.19.6 and 0.19.7: 0.19.8 checks) has reduced each sub-group's gradient norm over
        every rank before its first call, -1 where it is not finite (:meth:`watch_norm_groups`), so
        the first call decides every group from those norms: one host read and no collective."""
        todo = []
        for group in groups:
            if group["params"] and group["params"][0].grad is not None:
                part = self.parts[group["param_names"][0]]
                todo.append((part, group["params"][0].grad.detach().view(-1)[: part.end - part.start]))
        if self.finite_checked:  # a non-finite step never reaches the optimizer
            self._bad = {part.name: False for part, _ in todo}
            return
        step_key = getattr(self.engine, "global_steps", None)
        if step_key != self._ahead_step:
            self._ahead, self._ahead_step = {}, step_key
        if all(self._ahead.get(part.name, _UNREAD) != _UNREAD for part, _ in todo):
            self._bad = {part.name: bool(self._ahead.pop(part.name)) for part, _ in todo}
            return
        current = {part.name for part, _ in todo}
        if self.stage == 3 and not self._ahead and step_key is not None:
            decided_now = self._decided_by_norm_groups()
            if decided_now is not None:
                self._bad = {name: bool(decided_now.pop(name)) for name in current}
                self._ahead.update(decided_now)
                return
        entries: list[tuple[Partition, list[torch.Tensor] | None]]
        if self._ahead or step_key is None:  # decided at its own call
            entries = [(part, [grad]) for part, grad in todo]
        else:  # the first call of the engine step: every group, in the same order on every rank
            given = {part.name: [grad] for part, grad in todo}
            entries = [(part, given[part.name] if part.name in current else self._gradient_ahead(part))
                       for part in self.parts.values()]
        flags = torch.stack([_flag(part, tensors) for part, tensors in entries])
        by_group: dict[int, list[int]] = {}  # every holder of a part decides alike
        for i, (part, _) in enumerate(entries):
            if part.group is not None:
                by_group.setdefault(id(part.group), []).append(i)
        for indices in by_group.values():
            picked = flags[indices]
            comm.all_reduce_max(picked, entries[indices[0]][0].group)
            flags[indices] = picked
        decided = {part.name: value for (part, _), value in zip(entries, flags.tolist())}
        self._bad = {name: bool(decided.pop(name)) for name in current}
        self._ahead.update(decided)

    def watch_norm_groups(self, zopt) -> None:
        """ZeRO-3 on releases that do not check (0.19.6, 0.19.7): keep the per-sub-group gradient
        norms DeepSpeed reduces over every rank before its first ``step()`` call. Those releases
        replace a non-finite sub-group's norm by -1 and combine the norms as they are, so the global
        norm stays finite (clipping included) and only the per-sub-group values tell a NaN."""
        real = zopt._get_norm_groups
        by_sub_group = {part.source[1]: part.name for part in self.parts.values() if part.source}
        self._sub_group_names = [by_sub_group[s] for s in sorted(by_sub_group)]

        def recorded():
            norms = real()
            self._norm_groups = list(norms)
            return norms

        zopt._get_norm_groups = recorded

    def _decided_by_norm_groups(self) -> dict[str, float] | None:
        """Every group's skip flag (1.0: its gradient is not finite on some rank) from the norms
        :meth:`watch_norm_groups` kept for this engine step, with one host read and no collective;
        ``None`` when there are none to read."""
        norms, self._norm_groups = self._norm_groups, None
        if norms is None or len(norms) != len(self._sub_group_names):
            return None
        device = next((n.device for n in norms if torch.is_tensor(n)), torch.device("cpu"))
        values = torch.stack([torch.as_tensor(n, dtype=torch.float32, device=device).reshape(()) for n in norms])
        bad = (~torch.isfinite(values) | (values < 0)).tolist()
        return {name: float(flag) for name, flag in zip(self._sub_group_names, bad)}

    def _gradient_ahead(self, part: Partition) -> list[torch.Tensor] | None:
        """This rank's share of ``part``'s gradient as DeepSpeed holds it before handing it over
        (``averaged_gradients``: a list of tensors, or a pre-flattened partition), or ``None``."""
        zopt = getattr(self.engine, "optimizer", None)
        held = getattr(zopt, "averaged_gradients", None)
        if part.source is None or held is None or part.source[0] not in (1, 2):
            return None
        source = held.get(part.source[1]) if isinstance(held, dict) else (
            held[part.source[1]] if part.source[1] < len(held) else None)
        if source is None:
            return None
        flat = getattr(source, "flat_partition", None)
        tensors = [flat] if flat is not None else [t for t in source if torch.is_tensor(t)]
        size = sum(t.numel() for t in tensors)  # this share (padding at most): else not ours to read
        if not part.end - part.start <= size <= part.length:
            return None
        # The share's elements only, as at the group's own call: padding is no gradient of the parameter.
        share, left = [], part.end - part.start
        for t in tensors:
            if left <= 0:
                break
            share.append(t.reshape(-1)[:left])
            left -= share[-1].numel()
        return share

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
            gathered = cast(torch.Tensor, gathered)  # rows from other ranks: L > 0
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
            stage, index = cast("tuple[int, Any]", part.source)  # set by attach()
            p = part.param
            if stage in (1, 2):
                zopt.single_partition_of_fp32_groups[index].data[: piece.numel()].copy_(piece)
                p.data.copy_(full.view(p.shape).to(p.dtype))
            elif stage == 3:
                zopt.fp32_partitioned_groups_flat[index].data[: piece.numel()].copy_(piece)
                p.ds_tensor.data[: piece.numel()].copy_(piece.to(p.ds_tensor.dtype))  # type: ignore[attr-defined]  # ZeRO-3 adds it
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
        # skips from DeepSpeed's per-sub-group norms (see ZeroBinding.watch_norm_groups).
        from deepspeed.runtime.zero import stage3

        finite_checked = hasattr(stage3, "is_invalid_grad_norm")
    elif stage in (1, 2):
        # 0.19.8 skips a step whose global norm is not finite (unless bf16 without check_grad_overflow);
        # 0.19.7 only with check_grad_overflow (fp32 never: measured); 0.19.6, without compute_grad_norm,
        # is not trusted. Where DeepSpeed does not check, the adapter agrees on skips itself.
        from deepspeed.runtime.zero import stage_1_and_2

        norm, overflow = getattr(zopt, "compute_grad_norm", None), getattr(zopt, "check_grad_overflow", None)
        if norm is None or overflow is None:
            finite_checked = False
        elif hasattr(stage_1_and_2, "is_invalid_grad_norm"):
            finite_checked = bool(overflow) or (bool(norm) and zopt.dtype != torch.bfloat16)
        else:
            finite_checked = bool(overflow)
    else:
        finite_checked = False
    binding = ZeroBinding(stage, parts, engine, finite_checked)
    if stage == 3 and not finite_checked and hasattr(zopt, "_get_norm_groups"):
        binding.watch_norm_groups(zopt)
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


