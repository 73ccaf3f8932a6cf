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
``compute_grad_norm``, ``check_grad_overflow`` and ``averaged_gradients`` (ZeRO-1/2; 0.19.6 lacks
the first, and the adapter then agrees on skips itself); ``fp16_groups``, ``sub_group_to_group_id``,
``fp32_partitioned_groups_flat``, ``_get_sub_group_process_group`` and ``_get_norm_groups`` (ZeRO-3;
the adapter wraps the last on releases that do not check, to keep the norms); each parameter's
``partition_numel()``, ``ds_tensor`` and ``ds_shape``; the engine's ``basic_optimizer``,
``zero_optimization_stage()``, ``seq_dp_world_size``, ``skipped_steps`` and ``global_steps``; the
config's ``float16_config``, ``bfloat16_config``, ``torch_autocast_enabled``,
``managed_gradient_accumulation`` and ``compile_config``;
``deepspeed.runtime.tensor_parallel.init_utils.load_ds_config``; and whether
``deepspeed.runtime.zero.stage_1_and_2`` and ``deepspeed.runtime.zero.stage3`` have
``is_invalid_grad_norm`` (0.19.8's norm checks: its stage 3 skips non-finite steps).

Non-finite gradients: DeepSpeed 0.19.8 computes the global gradient norm and, when it is not
finite, skips the whole step on every rank (measured with ZeRO-1/2/3, fp32 and bf16: the replicas
stay identical and equal one process that skips that step). One process without DeepSpeed skips
only the parameters whose gradient is not finite. Where DeepSpeed does not check (0.19.6; 0.19.7's
stage 3, and its ZeRO-1/2 without ``check_grad_overflow``, which fp32 never sets; 0.19.8's bf16
ZeRO-1/2 with ``bf16.check_grad_overflow: false``), the adapter's own skip flags are agreed over
the ranks that hold each parameter. ZeRO-1/2: one max-reduction and one host read per engine step
(DeepSpeed calls ``step()`` once per parameter group, and the first call reads the later groups'
gradients where DeepSpeed still holds them, ``averaged_gradients``). ZeRO-3 on 0.19.6 and 0.19.7:
none. Before its first ``step()`` call DeepSpeed has reduced every sub-group's gradient norm over
the ranks and set it to -1 where it is not finite; the first call reads those norms (one host read)
and decides every sub-group. Those releases then combine the norms as they are, so the global norm,
and the clipping by it, stay finite. Where DeepSpeed checks, the adapter computes no flag and never
waits on the device.

Trust boundary: distopt reads checkpoint files with ``weights_only=True`` (:func:`safe_load` allows
only DeepSpeed's plain-data classes), so a planted file cannot run code through distopt's converter
or :func:`load_full_state`; the converter checks every file before DeepSpeed's ``zero_to_fp32``
reads them. DeepSpeed's own ``engine.load_checkpoint`` (same-size resume) unpickles its files with
``weights_only=False``: resume that way only from checkpoints you trust.

Modules
-------
``layout``      where a partition lies: its flat range, the rows it owns, the boundary exchange
``binding``     :class:`ZeroBinding` (the optimizer's :class:`~distopt.optim.base.EngineBinding`),
                :func:`attach`, and the one-group-per-parameter builder
``config``      the optimizer a DeepSpeed config names, what is refused, :func:`initialize`
``checkpoint``  safe loading, the converter and :func:`load_full_state`
``cli``         ``python -m distopt.deepspeed convert``
``names``       names the modules share (group tag, supported releases, formats)
"""

from __future__ import annotations

from .binding import ZeroBinding, attach, build_partitioned_optimizer
from .checkpoint import (
    DEEPSPEED_SAFE_GLOBALS,
    convert_checkpoint,
    load_full_state,
    merge_states,
    safe_load,
    saved_dp_world_size,
)
from .cli import main
from .config import REFUSALS, UnsupportedConfig, check_deepspeed_version, check_supported, initialize, split_optimizer_config
from .layout import Partition
from .names import CONFIG_PREFIX, DEEPSPEED_RANGE, FULL_FORMAT

__all__ = ["CONFIG_PREFIX", "DEEPSPEED_RANGE", "DEEPSPEED_SAFE_GLOBALS", "FULL_FORMAT", "REFUSALS", "Partition",
           "UnsupportedConfig", "ZeroBinding", "attach",
           "build_partitioned_optimizer", "check_deepspeed_version", "check_supported", "convert_checkpoint", "initialize",
           "load_full_state", "main", "merge_states", "safe_load", "saved_dp_world_size", "split_optimizer_config"]
