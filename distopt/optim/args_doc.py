"""Each optimizer's ``Args:`` section, built from one fragment per option (as ``torch.optim`` does
with ``_params_doc``): an option means the same in every class unless an override below says how
one algorithm reads it. Defaults come from the constructor's signature, so they cannot drift."""

from __future__ import annotations

import inspect

FRAGMENTS = {
    "params": "the model's parameter groups, as ``distopt.build_optimizer`` routes them",
    "lr": "learning rate",
    "betas": "Adam's decay rates of the first and second moments",
    "eps": "added to the RMS in Adam's denominator",
    "weight_decay": "decoupled weight decay (AdamW's)",
    "adam_form": "``torch`` (``eps`` after bias correction, as torch.optim.AdamW) or ``hf`` (Hugging Face / galore-torch)",
    "rank": "rank of the subspace",
    "update_proj_gap": "steps between a matrix's refreshes",
    "scale": "``alpha``, the factor of the back-projected update",
    "refresh": "how a basis is found from the gradient: ``randomized`` (range finder), ``svd`` or ``random`` (Haar)",
    "stagger": "spread the matrices' refreshes over the gap by a hash of each name (else all on the same steps)",
    "side": "``auto`` (the shorter side, as GaLore), ``longer`` (less state with two moments), ``left`` or ``right``: which side of the matrix is projected",
    "moment_policy": "what the moments become when the basis changes: ``keep``, ``reset``, ``rotate`` or ``transform``",
    "oversample": "extra Gaussian columns of the randomized range finder",
    "power_iters": "subspace iterations of the randomized range finder",
    "seed": "seed of every random draw, hashed with the parameter's name and the refresh index",
    "state_layout": "``partitioned`` (state split over the shard group) or ``replicated`` (whole on every rank)",
    "compile": "wrap the batched step's element-wise Adam math in ``torch.compile`` (one fused kernel per batch of matrices); the first steps compile",
    "projection_precision": "``fp32``, ``tf32`` (TF32 tensor cores for the projections on CUDA) or ``bf16`` "
                            "(bf16 operands, fp32 accumulation and moments); refreshes stay fp32",
    "basis_dtype": "storage of the basis between steps, ``fp32`` or ``bf16`` (half the bytes and the gather traffic; the step works on fp32)",
    "recovery_scaling": "add Fira's norm-scaled residual, the full-rank part the subspace discards",
    "norm_growth_limit": "Fira's cap on the residual's norm growth per step (``math.inf`` disables it)",
    "n_heads": "attention heads of ``q`` (read from the model when None)",
    "n_kv_heads": "key/value heads of ``k`` (read from the model when None)",
    "rank_fraction": "share of a matrix's entries the low-rank momentum factors hold",
    "fit_sweeps": "alternating-least-squares sweeps per step refitting the momentum factors",
    "correction": "low-rank momentum estimate: ``derived``, ``literal`` or ``none``",
    "clip": "element-wise clip ``kappa`` of the update (None: no clip)",
    "bias_correction": "divide the zero-started moments by ``1 - beta^t``",
    "galore_steps": "steps of data-driven (GaLore) bases before the random ones",
    "walk_angle": "geodesic step per basis direction, in radians",
    "tangent_rank": "directions of the random tangent (None: all ``r``)",
    "projection": "distribution of the random projection ``P``",
    "prox": "proximal weight ``1/eta`` pulling the increment back to 0",
    "factors": "the ``SubspaceLinear`` layers whose factors this optimizer trains (set by ``build_optimizer``)",
    "eps_inside_sqrt": "put ``eps`` inside the square root of the denominator",
    "step_size": "``eta`` of the geodesic tracking step, in radians per unit of ``sigma/||G||^2``",
    "max_angle": "cap of the tracking step's angle, in radians",
}

OVERRIDES = {
    ("adapm", "rank"): "fixed rank of the low-rank momentum factors (None: from ``rank_fraction``)",
    ("adapm", "update_proj_gap"): "steps between re-seedings of the momentum factors by the range finder",
    ("sam", "rank"): "rank of the momentum subspace (None: ``min(5, m // 10)``)",
    ("rso", "update_proj_gap"): "``tau``, steps between fresh random subspaces (the increment is merged then)",
    ("rso", "scale"): "factor of the random projection's entries",
    ("golore", "refresh"): "how bases are found from the gradient in the first ``galore_steps`` steps",
    ("grassjump", "refresh"): "how the first basis is found from the gradient (``random``: every basis is Haar)",
    ("grasswalk", "refresh"): "how the first basis is found from the gradient; the walk moves it from there",
    ("subtrack", "refresh"): "how the first basis is found from the gradient; the tracking moves it from there",
}


def _fragment(cls: type, key: str) -> str:
    for klass in cls.__mro__:  # a subclass inherits its parent's reading (adapm-mini: adapm's)
        if (klass.__dict__.get("algorithm"), key) in OVERRIDES:
            return OVERRIDES[(klass.__dict__["algorithm"], key)]
    if key not in FRAGMENTS:
        raise KeyError(f"{cls.__name__}: option {key!r} has no fragment in distopt.optim.args_doc.FRAGMENTS")
    return FRAGMENTS[key]


def args_section(cls: type[object]) -> str:
    """``Args:`` lines for every parameter of ``cls.__init__``, with its default."""
    lines = ["Args:"]
    for key, parameter in inspect.signature(cls.__init__).parameters.items():
        if key == "self":
            continue
        default = "" if parameter.default is inspect.Parameter.empty else f" (default ``{parameter.default!r}``)"
        lines.append(f"    {key}{default}: {_fragment(cls, key)}")
    return "\n".join(lines)


def add_args_section(cls: type) -> None:
    """Append the ``Args:`` section to the class docstring (indented as the docstring is)."""
    doc = cls.__doc__ or ""
    indent = "    " if "\n    " in doc else ""
    cls.__doc__ = doc.rstrip() + "\n\n" + "\n".join(indent + line for line in args_section(cls).splitlines()) + "\n"
