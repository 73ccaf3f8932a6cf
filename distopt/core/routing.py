"""Roles of parameters, from their fully qualified names.

A table of ``(regex, role)`` rules is searched in order and the first match wins. The defaults
cover Hugging Face LLaMA/Mistral/Qwen, GPT-2 and GPT-NeoX names. User rules go before the defaults,
and a user rule that matches no parameter is an error, so a typo cannot silently route nothing.
Algorithms decide per role what to do (project it, give it no momentum, leave it to AdamW).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

ROLES = (
    "embedding", "lm_head", "q", "k", "v", "qkv", "o", "mlp_in", "mlp_out", "matrix",
    "norm", "bias", "other",
)
# Roles of attention and MLP linear weights: the matrices subspace methods act on.
LINEAR_ROLES = frozenset({"q", "k", "v", "qkv", "o", "mlp_in", "mlp_out", "matrix"})

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"\.bias$|^bias$", "bias"),
    (r"(norm|ln_\w+|ln_f|layernorm|layer_norm)[^.]*\.weight$", "norm"),
    (r"(embed_tokens|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|embed_in)\.weight$", "embedding"),
    (r"(lm_head|embed_out|output)\.weight$", "lm_head"),
    (r"(q_proj|wq|query)\.weight$", "q"),
    (r"(k_proj|wk|key)\.weight$", "k"),
    (r"(v_proj|wv|value)\.weight$", "v"),
    (r"(c_attn|qkv_proj|W_pack|query_key_value|wqkv)\.weight$", "qkv"),
    (r"(o_proj|wo|attn\.c_proj|out_proj|attention\.dense|self_attn\.dense)\.weight$", "o"),
    (r"(gate_proj|up_proj|w1|w3|c_fc|fc1|dense_h_to_4h|gate_up_proj)\.weight$", "mlp_in"),
    (r"(down_proj|w2|mlp\.c_proj|fc2|dense_4h_to_h)\.weight$", "mlp_out"),
)


def _compile(rules: Iterable[tuple[str, str]], source: str) -> list[tuple[re.Pattern, str, str]]:
    compiled = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{source} rule {item!r} must be a (regex, role) pair")
        pattern, role = item
        if role not in ROLES:
            raise ValueError(f"{source} rule {pattern!r} -> {role!r}: role must be one of {ROLES}")
        try:
            compiled.append((re.compile(pattern), pattern, role))
        except re.error as err:
            raise ValueError(f"{source} rule {pattern!r} is not a valid regex: {err}") from None
    return compiled


def assign_roles(
    names: Sequence[str],
    rules: Iterable[tuple[str, str]] | None = None,
    use_default_rules: bool = True,
) -> dict[str, str]:
    """Map each name to a role. Unmatched names get ``other``."""
    user = _compile(rules or (), "user")
    table = user + (_compile(DEFAULT_RULES, "default") if use_default_rules else [])
    roles = {}
    for name in names:
        roles[name] = next((role for regex, _, role in table if regex.search(name)), "other")
    unused = [pattern for regex, pattern, _ in user if not any(regex.search(n) for n in names)]
    if unused:
        sample = ", ".join(list(names)[:6])
        raise ValueError(
            f"routing rule(s) {unused} matched no parameter (names look like: {sample}, ...). "
            "Fix the pattern, or remove the rule."
        )
    return roles
