"""Per-rank memory of training a model: weights, gradients, optimizer state and projectors.

Pure functions of parameter shapes and hyper-parameters; nothing is allocated. The optimizer
part comes from the optimizer itself: it is built on the model's parameters (use a model made
under ``torch.device("meta")``), its state is allocated on the meta device with
``allocate_state()``, and the state tensors' shapes are summed. So the numbers follow each
algorithm's own state layout, and on one rank they equal :func:`distopt.state_bytes` of a real
optimizer exactly (tests/unit/test_memory.py checks it).

Model states per rank, for ``P`` parameters, ``N`` ranks sharing the states (the world size,
or the shard-group size for HSDP) and ``L`` parameters in the largest FSDP unit (a decoder layer,
or the embedding and LM head):

=================  ==========================  ===============================
engine             weights                     gradients
=================  ==========================  ===============================
ddp                ``w P``                     ``g P``
fsdp2 / hsdp       ``w P/N + 2 c L``           ``g P/N + r L``
zero1 (DeepSpeed)  ``2 P + 4 P/N`` (master)    ``2 P + 4 P/N`` (fp32 partition)
zero2              ``2 P + 4 P/N``             ``2 P/N + 4 P/N``
zero3              ``2 P/N + 4 P/N + 2·2 L``   ``2 P/N + 4 P/N``
=================  ==========================  ===============================

with ``w``, ``g`` the bytes of a weight and a gradient for the precision (``fp32``: 4, 4;
``bf16-mixed``, torch autocast: 4, 4; ``bf16``: 2, 2), ``c`` the bytes of a gathered weight
(the compute dtype) and ``r`` of an unsharded gradient before its reduce-scatter. FSDP2 and ZeRO-3
hold two gathered units at a time (the current one and the prefetched next one). DeepSpeed keeps
bf16 weights and an fp32 master copy for ``bf16`` and ``bf16-mixed`` alike.

For AdamW (12 bytes of master + moments per parameter, ``K = 12`` in the ZeRO paper) this gives
ZeRO-1 ``4P + 16P/N``, which is DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (it covers
stages 1 and 2), ZeRO-2 ``2P + 18P/N``, and ZeRO-3 ``20P/N + 4L``, where DeepSpeed's
``estimate_zero3_model_states_mem_needs`` prints ``18P/N + 4L`` (it leaves out the bf16
gradient partition). :func:`deepspeed_reference` returns DeepSpeed's numbers for comparison.

Optimizer state placement:
- ``ddp``: whole on every rank.
- ``fsdp2``/``hsdp``: each rank holds a row block of every matrix (rank 0 the largest,
  ``ceil(m/N)`` rows); the algorithm's own shard view decides the state shapes. With the default
  ``state_layout="partitioned"`` a GaLore right basis keeps ``ceil(n/N)`` of its ``n`` rows and a
  left side's ``r x n`` moments ``ceil(n/N)`` columns; ``"replicated"`` keeps both whole on every
  rank. Element-wise state is split by rows.
- ``zero1/2/3``: the same row blocks: ``distopt.deepspeed`` turns each rank's flat ZeRO partition
  of a matrix into a block of about ``m/N`` rows and steps the algorithm on it, so the state
  follows the FSDP2 layout above (element-wise state is the rank's flat slice, about ``1/N``).

Activations, communication buckets, the optimizer step's temporaries (batches and buckets: at
most ``coalesce_bytes``, 768 MiB by default, in one process and under twice that sharded; a matrix
stepped alone, an embedding larger than that, two fp32 copies of itself), the CUDA context and
allocator fragmentation are not counted: keep a reserve for them (``fits(..., reserve=0.1)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .core.shard import chunk_rows

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ENGINES = ("single", "ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
_PROJECTOR_KEY = re.compile(r"basis|proj|^[PQUV]$|ortho", re.IGNORECASE)
_SHARDED = cast("ProcessGroup", object())  # stands in for a process group: the view only needs to know it is sharded


def is_projector_key(key: str) -> bool:
    """State entries that hold a subspace basis (GaLore's ``basis``, ``proj*``, ``P``/``Q``)."""
    return bool(_PROJECTOR_KEY.search(key))


@dataclass
class ParamState:
    """Optimizer state of one parameter on the rank that holds the most of it."""

    name: str
    numel: int
    kind: str  # "matrix" or "adamw"
    state_bytes: int  # moments, step counters, anything but projectors
    projector_bytes: int
    held_projector_numel: int = 0  # elements of projectors the model holds for the optimizer (RSO's P)

    @property
    def total(self) -> int:
        return self.state_bytes + self.projector_bytes


@dataclass
class Breakdown:
    optimizer: str
    engine: str
    world_size: int
    precision: str
    num_params: int
    weights: int
    gradients: int
    optimizer_state: int
    projectors: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.projectors

    def fits(self, capacity_bytes: float, reserve: float = 0.1) -> bool:
        """Whether the model states fit in ``capacity_bytes`` with a fraction ``reserve`` left
        for activations, buffers and fragmentation."""
        return self.total <= capacity_bytes * (1.0 - reserve)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def zero_partition_length(numel: int, world: int, engine: str) -> int:
    """Elements per rank of a parameter that ``distopt.deepspeed`` puts in a group of its own:
    ZeRO-3 cuts it into ``ceil(numel / N)``; ZeRO-1/2 pad the group's flat buffer to a multiple of
    ``2 N`` first."""
    if engine == "zero3":
        return math.ceil(numel / world)
    return math.ceil(numel / (2 * world)) * 2


def _zero_partition(shape: tuple[int, ...], world: int, engine: str):
    """The layout ``distopt.deepspeed`` reads from ZeRO for a parameter of ``shape`` (its flat ranges
    and, for a matrix, its row blocks), computed rather than read."""
    from .engines.deepspeed import Partition

    length = zero_partition_length(math.prod(shape), world, engine)
    # A layout only: no parameter behind it, nothing allocated.
    return Partition(name="", param=None, kind="", shape=tuple(shape), length=length, rank=0, world=world, group=None,  # type: ignore[arg-type]
                     device="meta")  # type: ignore[arg-type]


def _shard_rows(engine: str, shape: tuple[int, int], world: int) -> tuple[int, ...]:
    """Rows of a matrix per rank: ``torch.chunk`` blocks (FSDP2's ``Shard(0)``), or the row blocks
    ``distopt.deepspeed`` builds from ZeRO's flat partitions."""
    if not engine.startswith("zero"):
        return chunk_rows(shape[0], world)
    part = _zero_partition(shape, world, engine)
    return tuple(end - start for start, end in map(part.rows, range(world)))


def state_layout(model: nn.Module, optimizer: str, hparams: dict | None = None, shard_ranks: int = 1, *,
                 engine: str = "fsdp2", shard_index: int = 0) -> list[ParamState]:
    """Per-parameter optimizer state of ``optimizer`` on ``model`` (build it on the meta device).

    ``shard_ranks > 1``: every matrix is row-sharded over that many ranks (FSDP2, HSDP's shard
    group, ZeRO through ``distopt.deepspeed``; ``engine`` picks how the rows are cut) and the state
    is the one rank ``shard_index`` holds (rank 0 by default: under FSDP2 the largest row block).
    Element-wise state is split by rows (FSDP2) or in flat slices (ZeRO) likewise.
    """
    from .api import build_optimizer
    from .core.shard import MatrixShardView

    if not 0 <= shard_index < shard_ranks:
        raise ValueError(f"shard_index={shard_index}: must be in [0, {shard_ranks})")
    check_supported(optimizer, engine)
    zero = engine.startswith("zero")
    hparams = dict(hparams or {})
    elementwise = hparams.pop("elementwise", None)
    with torch.device("meta"):
        meta = _to_meta(model)
        opt = build_optimizer(meta, optimizer, elementwise=elementwise, **hparams)
        if shard_ranks > 1:
            views = {}
            for p, view in opt.views.items():
                counts = _shard_rows(engine, view.global_shape, shard_ranks)
                start = sum(counts[:shard_index])
                views[p] = MatrixShardView(view.name, view.global_shape, start, start + counts[shard_index], _SHARDED,
                                           counts, index=shard_index)
            opt.set_views(views)
        opt.allocate_state()
    held = opt.projections_in_model()
    out = []
    names = {p: n for n, p in meta.named_parameters()}
    for group in opt.param_groups:
        kind = group.get("kind", "adamw")
        for p in group["params"]:
            state, proj = 0, 0
            for key, value in opt.state[p].items():
                if not isinstance(value, torch.Tensor):
                    continue
                size = _tensor_bytes(value)
                if kind != "matrix" and shard_ranks > 1 and value.dim() > 0:
                    if zero:  # this rank's flat slice
                        start, end = _zero_partition(tuple(value.shape), shard_ranks, engine).bounds(shard_index)
                        size = (end - start) * value.element_size()
                    else:
                        size = size * chunk_rows(value.shape[0], shard_ranks)[shard_index] // max(1, value.shape[0])
                if kind == "matrix" and is_projector_key(key):
                    proj += size
                else:
                    state += size
            held_numel = 0
            if p in held:  # a projector kept in the model (RSO's P)
                tensor = held[p]
                # A parameter is row-sharded by FSDP2, which pads every rank's storage to ceil(rows / N)
                # rows; a buffer is whole on every rank.
                sharded = isinstance(tensor, nn.Parameter) and shard_ranks > 1
                rows = -(-tensor.shape[0] // shard_ranks) if sharded else tensor.shape[0]
                held_numel = rows * math.prod(tensor.shape[1:])
                proj += held_numel * tensor.element_size()
            out.append(ParamState(names.get(p, "?"), p.numel(), kind, state, proj, held_numel))
    return out


def _to_meta(model: nn.Module) -> nn.Module:
    """A meta-device copy: some algorithms change the model they are built for (RSO, Adam-mini)."""
    import copy

    clone = copy.deepcopy(model)
    if any(p.device.type != "meta" for p in clone.parameters()):
        clone = clone.to_empty(device="meta")
    return clone


def largest_unit_params(model: nn.Module) -> int:
    """Parameters of the largest FSDP unit: a decoder layer (``...layers.<i>.``) or everything
    outside the layers (embedding, final norm, LM head)."""
    units: dict[str, int] = {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        m = re.search(r"(.*\b(?:layers|h|blocks)\.\d+)\.", name)
        units[m.group(1) if m else "<root>"] = units.get(m.group(1) if m else "<root>", 0) + p.numel()
    return max(units.values()) if units else 0


def supported(optimizer: str, engine: str) -> bool:
    """Whether ``distopt`` trains ``optimizer`` under ``engine`` (RSO reparametrizes layers, which
    DeepSpeed's flat partitions do not allow)."""
    return not (optimizer == "rso" and engine.startswith("zero"))


def check_supported(optimizer: str, engine: str) -> None:
    if not supported(optimizer, engine):
        raise ValueError(f"{optimizer} is not available under DeepSpeed ZeRO ({engine}): use fsdp2, hsdp or ddp")


@dataclass(frozen=True)
class ModelCounts:
    """Parameters of the model as the optimizer trains it (RSO adds factors and freezes weights)."""

    total: int  # every parameter, frozen ones included, less projectors counted as optimizer memory
    trainable: int  # those with gradients
    largest_unit: int  # parameters of the largest FSDP unit, projectors included (they are gathered too)


def model_counts(model: nn.Module, optimizer: str = "adamw", hparams: dict | None = None) -> ModelCounts:
    """Parameter counts of ``model`` as ``optimizer`` trains it. Algorithms that change the model
    (``prepare_model``) are built on a meta copy to see the model they will train."""
    from .optim import REGISTRY
    from .optim.base import SubspaceOptimizer

    cls = REGISTRY.get(optimizer)
    held: set[int] = set()
    # The classmethods' functions: mypy does not model __func__.
    if cls is not None and cls.prepare_model.__func__ is not SubspaceOptimizer.prepare_model.__func__:  # type: ignore[attr-defined]
        from .api import build_optimizer

        hparams = dict(hparams or {})
        hparams.pop("elementwise", None)
        with torch.device("meta"):
            model = _to_meta(model)
            opt = build_optimizer(model, optimizer, **hparams)
        held = {id(t) for t in opt.projections_in_model().values()}
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen or id(p) in held:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ModelCounts(total, trainable, largest_unit_params(model))


def _dtype_bytes(precision: str) -> tuple[int, int, int, int]:
    """(weight, gradient, gathered compute copy, unsharded gradient) bytes for torch engines."""
    if precision == "fp32":
        return 4, 4, 4, 4
    if precision == "bf16-mixed":
        return 4, 4, 2, 4  # fp32 weights and grads; bf16 compute copies; fp32 reduce
    if precision == "bf16":
        return 2, 2, 2, 2
    raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")


def estimate(
    model: nn.Module,
    optimizer: str,
    engine: str,
    world_size: int,
    precision: str = "bf16-mixed",
    *,
    hparams: dict | None = None,
    hsdp_replicas: int = 1,
    layout: list[ParamState] | None = None,
) -> Breakdown:
    """Model-state memory of the most loaded rank. See the module docstring for the formulas."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    if engine == "single" and world_size != 1:
        raise ValueError("engine='single' means world_size=1")
    check_supported(optimizer, engine)
    counts = model_counts(model, optimizer, hparams)
    total, trainable, largest = counts.total, counts.trainable, counts.largest_unit
    n = world_size
    notes: list[str] = []
    w, g, c, r = _dtype_bytes(precision)
    if trainable < total:
        notes.append(f"{total - trainable:,} frozen parameters have no gradient")

    if engine == "hsdp":
        if hsdp_replicas < 1 or world_size % hsdp_replicas:
            raise ValueError(f"hsdp_replicas={hsdp_replicas} must divide world_size={world_size}")
        n = world_size // hsdp_replicas
        notes.append(f"hsdp: {hsdp_replicas} replica group(s) of {n} shard rank(s)")

    if engine in ("single", "ddp"):
        weights, grads = w * total, g * trainable
        if precision == "bf16-mixed":
            notes.append("bf16-mixed under torch engines is autocast: fp32 weights and gradients")
    elif engine in ("fsdp2", "hsdp"):
        weights = math.ceil(w * total / n) + (2 * c * largest if n > 1 else 0)
        grads = math.ceil(g * trainable / n) + (r * largest if n > 1 else 0)
    else:  # DeepSpeed ZeRO: bf16 weights with an fp32 master, or fp32 throughout
        if precision == "fp32":
            full_w, full_g, master, part_g = 4 * total, 4 * total, 0, 0
            shard_w, shard_g = math.ceil(4 * total / n), math.ceil(4 * total / n)
        else:
            full_w, full_g = 2 * total, 2 * total
            master, part_g = math.ceil(4 * total / n), math.ceil(4 * total / n)
            shard_w, shard_g = math.ceil(2 * total / n), math.ceil(2 * total / n)
            if precision == "bf16":
                notes.append("DeepSpeed keeps an fp32 master copy in bf16 too")
        if engine == "zero1":
            weights, grads = full_w + master, full_g + part_g
        elif engine == "zero2":
            weights, grads = full_w + master, shard_g + part_g
        else:
            weights = shard_w + master + 2 * (2 if precision != "fp32" else 4) * largest
            grads = shard_g + part_g
    if layout is None:
        layout = state_layout(model, optimizer, hparams, shard_ranks=n if engine not in ("single", "ddp") else 1,
                              engine=engine)
    state = sum(s.state_bytes for s in layout)
    projectors = sum(s.projector_bytes for s in layout)
    if precision == "bf16":  # projectors held in the model take the weights' dtype (counted at fp32 above)
        projectors -= (4 - w) * sum(s.held_projector_numel for s in layout)
    return Breakdown(optimizer, engine, world_size, precision, total, weights, grads, state, projectors, notes)


def deepspeed_reference(engine: str, num_params: int, world_size: int, largest_layer_params: int = 0) -> int | None:
    """DeepSpeed's own model-state estimate for AdamW without offload, in bytes (None for
    non-ZeRO engines): ``4P + 16P/N`` for ZeRO-1/2, ``4L + 18P/N`` for ZeRO-3."""
    if engine in ("zero1", "zero2"):
        return 4 * num_params + int(16 * num_params / world_size)
    if engine == "zero3":
        return 4 * largest_layer_params + int(18 * num_params / world_size)
    return None
