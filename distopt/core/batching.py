"""State of same-shape matrices packed into shared buffers, so that one kernel steps them all.

A buffer of shape ``(k, *shape)`` holds one state tensor (``exp_avg``, say) of ``k`` matrices, and
each matrix's state dict holds its slice ``buffer[i]``. The state dict stays keyed by parameter
name and tensor-only; a checkpoint loads into the slices with ``copy_``, so one written before the
packing existed loads the same; and a batched kernel reads and writes all ``k`` with no copy.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch


def shared_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The contiguous buffer whose slices ``0..k-1`` are ``tensors`` in order, else ``None``."""
    first = tensors[0]
    base = first._base
    if base is None or base.dim() != first.dim() + 1 or base.shape[0] != len(tensors) or not base.is_contiguous():
        return None
    start, stride = base.data_ptr(), base.stride(0) * base.element_size()
    for i, t in enumerate(tensors):
        if t._base is not base or t.data_ptr() != start + i * stride:
            return None
    return base


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, read only: where they lie back to back in one storage (consecutive
    slices ``base[a], base[a + 1], ...`` of a class gathered in one block, say), a view of them, with
    no copy."""
    first = tensors[0]
    base = first._base
    # Each must be a row of the buffer as it lies: same shape and strides (a transposed view of a
    # square row would pass every other test and give its transpose).
    if (base is not None and base.dim() == first.dim() + 1 and base.is_contiguous() and base.numel()
            and first.shape == base.shape[1:] and first.stride() == base.stride()[1:]):
        step = base.stride(0) * base.element_size()
        start, rest = divmod(first.data_ptr() - base.data_ptr(), step)
        if (not rest and 0 <= start and start + len(tensors) <= base.shape[0] and all(
                t._base is base and t.shape == first.shape and t.stride() == first.stride()
                and t.data_ptr() == first.data_ptr() + i * step for i, t in enumerate(tensors))):
            return base if len(tensors) == base.shape[0] else base[start : start + len(tensors)]
    # Back to back in one storage by any other road (slices of a view of a buffer, whose ``_base`` is
    # the buffer's root): one strided view over them.
    if _back_to_back(tensors):
        return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()), first.storage_offset())
    return torch.stack(list(tensors))


def _back_to_back(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` lie back to back, in order, in one storage: dense, of one shape and dtype.
    Found from storage offsets, so it holds for tensors re-pointed with ``.data`` too, and for views
    of views, whose ``_base`` is their root."""
    first = tensors[0]
    if not first.is_contiguous() or not first.numel():
        return False
    start, size, ptr = first.storage_offset(), first.numel(), first.untyped_storage().data_ptr()
    return all(t.dtype == first.dtype and t.shape == first.shape and t.is_contiguous()
               and t.untyped_storage().data_ptr() == ptr and t.storage_offset() == start + i * size
               for i, t in enumerate(tensors))


def packed_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A ``(k, *shape)`` tensor over the memory of ``tensors`` where they lie back to back in one
    storage, dense and of one dtype (as :func:`distopt.pack_weights` lays out same-shape weights), so
    that one in-place kernel writes all of them; else ``None`` (:func:`_back_to_back`). A new tensor
    set to their storage, not a view of any of them."""
    if not _back_to_back(tensors):
        return None
    first = tensors[0]
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (len(tensors), *first.shape),
                                   (first.numel(), *first.stride()))


def packed(states: list[dict], key: str) -> tuple[torch.Tensor, bool]:
    """``states[i][key]`` as one ``(k, ...)`` tensor, and whether it is a copy to store back
    (:func:`store_back`) after writing to it.

    The first call on tensors that are in no buffer yet packs them: it stacks them into a new buffer
    and puts its slices in the state dicts, so later calls return that buffer itself. Tensors packed
    with other companions (a matrix skipped for a non-finite gradient when the buffer was made) are
    stacked into a copy instead: a new buffer would keep the old one alive for its other slices.
    """
    tensors = [state[key] for state in states]
    base = shared_buffer(tensors)
    if base is not None:
        return base, False
    stacked = torch.stack(tensors)
    if all(t._base is None for t in tensors):
        for i, state in enumerate(states):
            state[key] = stacked[i]
        return stacked, False
    return stacked, True


def store_back(states: list[dict], key: str, stacked: torch.Tensor) -> None:
    """Write a copy made by :func:`packed` back into the state tensors."""
    torch._foreach_copy_([state[key] for state in states], list(stacked.unbind(0)))


class PackedState:
    """The packed state of one batch of matrices: :func:`packed` once, then the buffers it made,
    checked on each use by the identity of every state dict's slice (a load or a re-allocation that
    replaced a tensor makes it pack again)."""

    def __init__(self, states: list[dict]):
        self.states = states
        self._held: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def get(self, key: str) -> tuple[torch.Tensor, bool]:
        """As :func:`packed`: the ``(k, ...)`` tensor, and whether it is a copy to :meth:`store_back`."""
        held = self._held.get(key)
        if held is not None and all(map(operator.is_, map(operator.itemgetter(key), self.states), held[1])):
            return held[0], False
        value, copied = packed(self.states, key)
        if copied:
            self._held.pop(key, None)
        else:
            self._held[key] = (value, tuple(state[key] for state in self.states))
        return value, copied

    def store_back(self, key: str, value: torch.Tensor) -> None:
        store_back(self.states, key, value)


def per_matrix(values: list[float], like: torch.Tensor, dims: int, as_tensor: bool = False) -> float | torch.Tensor:
    """One scalar per matrix of a batch: the float itself when they are all equal (unless
    ``as_tensor``), else a tensor of ``dims`` dimensions, ``(k, 1, ..., 1)``, on ``like``'s device,
    to broadcast over the batch."""
    if min(values) == max(values) and not as_tensor:
        return values[0]
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True).view(-1, *[1] * (dims - 1))


def dense(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every tensor is contiguous: what torch's fused CPU kernels (AdamW's, SGD's) need, since
    they walk each tensor as one dense block and write between the strides of any other."""
    return all(map(torch.Tensor.is_contiguous, tensors))


_dtype = operator.attrgetter("dtype")
# Device types whose fused SGD kernel is missing (the update then takes two foreach calls).
_no_fused_sgd: set[str] = set()


def add_updates(weights: list[torch.Tensor], updates: Sequence[torch.Tensor], decay: float) -> None:
    """``w <- w - decay w + u`` for each weight and update: one pass over each pair in one kernel call
    (torch's fused SGD kernel, learning rate 1, ``decay`` as its weight decay), not two ``foreach`` calls
    that, on CPU, dispatch one op per tensor. That kernel assumes contiguous tensors of one dtype, so
    anything else takes the ``foreach`` calls."""
    device = weights[0].device.type
    if (device not in _no_fused_sgd and dense(weights) and dense(updates)
            and all(map(operator.eq, map(_dtype, weights), map(_dtype, updates)))):
        try:
            # maximize: the kernel adds the "gradient" (it steps as -(-u + decay w)).
            torch._fused_sgd_(weights, list(updates), [], weight_decay=decay, momentum=0.0, lr=1.0, dampening=0.0,
                              nesterov=False, maximize=True, is_first_step=False)
            return
        except (NotImplementedError, RuntimeError, AttributeError):
            _no_fused_sgd.add(device)
    if decay:
        torch._foreach_mul_(weights, 1.0 - decay)
    torch._foreach_add_(weights, list(updates))


# Device types whose fused Adam kernels are missing (the callers then take their eager ops).
_no_fused_adam: set[str] = set()


def fused_adam(kernel, device: str, *args, **kwargs) -> bool:
    """``kernel(*args, **kwargs)``, one of torch's fused Adam kernels (``torch._fused_adam_`` or
    ``torch._fused_adamw_``) on tensors of ``device``; False, with nothing written, where that device
    lacks them (remembered: later calls do not try again)."""
    if device in _no_fused_adam:
        return False
    try:
        kernel(*args, **kwargs)
    except (NotImplementedError, RuntimeError, AttributeError):  # raised before any write: no kernel here
        _no_fused_adam.add(device)
        return False
    return True


def _fused_adam_steps(tensors: Sequence[torch.Tensor], lows: Sequence[torch.Tensor],
                      counts: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The count tensor of each of ``lows`` for a fused Adam call (``counts``: one for all, or one
    each), or ``None`` where the call cannot run: the device lacks the kernel, or one of ``tensors``
    is not dense fp32 (the kernel walks each one as a dense block)."""
    if lows[0].device.type in _no_fused_adam or not dense(tensors) or any(t.dtype != torch.float32 for t in tensors):
        return None
    return list(counts) if len(counts) == len(lows) else list(counts) * len(lows)


def scaled_adam_directions(avgs: Sequence[torch.Tensor], avg_sqs: Sequence[torch.Tensor], lows: Sequence[torch.Tensor],
                           outs: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], step: float, beta1: float,
                           beta2: float, eps: float, zeroed: bool = False) -> bool:
    """Adam's moments of the projections ``lows`` (updated in place) and their scaled directions
    ``-step M / c_1 / (sqrt(V) / c_2 + eps)`` written into ``outs``, with the bias corrections
    ``c = 1 - beta^t`` of ``counts`` (float tensors on the device: one for all, or one each). Each
    list holds whole batches ``(k, ...)`` or single matrices. One pass in one kernel: torch's fused
    Adam kernel steps the zeroed ``outs`` (zeroed here unless ``zeroed`` says they are) as its
    parameters, where the eager math takes eight. False where that kernel is missing or a tensor is
    not dense fp32 (the kernel walks each one as a dense block); nothing is written then."""
    steps = _fused_adam_steps((*avgs, *avg_sqs, *lows, *outs), lows, counts)
    if steps is None:
        return False
    if not zeroed:
        torch._foreach_zero_(list(outs))
    return fused_adam(torch._fused_adam_, lows[0].device.type, list(outs), list(lows), list(avgs), list(avg_sqs), [], steps, lr=step,
                      beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)


# Device types whose fused AdamW kernel was probed with a parameter that is also its gradient:
# True where it gave the unaliased call's numbers (it reads each element before writing it).
_in_place_adam: dict[str, bool] = {}


def _in_place_adam_safe(device: torch.device) -> bool:
    """Whether ``device``'s fused AdamW kernel, handed one tensor as both parameter and gradient,
    gives what it gives with two: probed once per device type, on a short tensor and one longer
    than a GPU kernel's chunk, against the parameter given as zeros."""
    known = _in_place_adam.get(device.type)
    if known is not None:
        return known
    generator = torch.Generator().manual_seed(0)
    sizes = (5, 70_001)
    lows = [torch.randn(size, generator=generator).to(device) for size in sizes]
    avgs = [torch.randn(size, generator=generator).to(device) for size in sizes]
    avg_sqs = [torch.rand(size, generator=generator).to(device) for size in sizes]
    expected = [torch.zeros_like(low) for low in lows]
    reference = (expected, [low.clone() for low in lows], [t.clone() for t in avgs], [t.clone() for t in avg_sqs])
    steps = [torch.full((), 3.0, device=device)] * len(sizes)
    try:
        for params, grads, moments, squares in (reference, (lows, lows, avgs, avg_sqs)):
            torch._fused_adamw_(params, grads, moments, squares, [], steps, lr=1.0, beta1=0.9, beta2=0.999,
                                weight_decay=1.0, eps=1e-8, amsgrad=False, maximize=False)
    except (NotImplementedError, RuntimeError, AttributeError):
        _in_place_adam[device.type] = False
        return False
    safe = all(torch.equal(a, b) for a, b in zip([*lows, *avgs, *avg_sqs], [*expected, *reference[2], *reference[3]]))
    _in_place_adam[device.type] = safe
    return safe


def adam_directions_in_place(avgs: Sequence[torch.Tensor], avg_sqs: Sequence[torch.Tensor], lows: Sequence[torch.Tensor],
                             counts: Sequence[torch.Tensor], beta1: float, beta2: float, eps: float) -> bool:
    """Adam's moments of the projections ``lows`` (updated in place), and each of ``lows`` overwritten
    by its direction ``-M / c_1 / (sqrt(V) / c_2 + eps)``, unscaled (bias corrections ``c = 1 -
    beta^t`` of ``counts``, as in :func:`scaled_adam_directions`). One pass in one kernel and no
    other buffer: torch's fused AdamW kernel with each of ``lows`` as gradient and parameter, learning
    rate 1 and weight decay 1, so that the parameter is zeroed (``R (1 - 1 * 1)``, exact for finite
    ``R``) after its gradient is read and before the direction is subtracted. Used only on devices
    whose kernel was seen to read each element before writing it (:func:`_in_place_adam_safe`).
    False where that does not hold or a tensor is not dense fp32; nothing is written then."""
    steps = _fused_adam_steps((*avgs, *avg_sqs, *lows), lows, counts)
    device = lows[0].device
    if steps is None or not _in_place_adam_safe(device):
        return False
    return fused_adam(torch._fused_adamw_, device.type, list(lows), list(lows), list(avgs), list(avg_sqs), [], steps,
                      lr=1.0, beta1=beta1, beta2=beta2, weight_decay=1.0, eps=eps, amsgrad=False, maximize=False)
