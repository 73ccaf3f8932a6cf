"""LLaMA models from ``configs/models/*.yaml``.

``impl=hf`` builds ``transformers.LlamaForCausalLM``; ``impl=native`` builds
:class:`distopt.models.TinyLlama` (same parameter names, no transformers needed). ``auto`` picks
``hf`` when transformers is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .config import ConfigError, find_named, known_names


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def num_params(self) -> int:
        h, i, layers, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = self.kv_heads * (h // self.num_attention_heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + layers * per_layer + h

    def largest_layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        kv = self.kv_heads * (h // self.num_attention_heads)
        return max(self.vocab_size * h, 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def model_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    found = find_named("models", [f"llama_{name}.yaml", f"{name}.yaml"])
    if found:
        return found
    known = ", ".join(n.replace("llama_", "") for n in known_names("models"))
    raise ConfigError(f"model.name={name!r}: no configs/models/llama_{name}.yaml and no such YAML file (known: {known})")


def load_shape(name: str) -> ModelShape:
    path = model_config_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    fields = {f.name: f for f in dataclasses.fields(ModelShape)}
    problems = [f"{path}: unknown key {k!r} (known: {', '.join(fields)})" for k in raw if k not in fields]
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in raw]
    problems += [f"{path}: missing key {k!r}" for k in missing]
    if problems:
        raise ConfigError(problems)
    shape = ModelShape(**raw)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        value = getattr(shape, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{path}: {key}={value!r} must be a positive integer")
    if not problems:
        if shape.hidden_size % shape.num_attention_heads:
            problems.append(f"{path}: hidden_size={shape.hidden_size} must divide by num_attention_heads={shape.num_attention_heads}")
        elif (shape.hidden_size // shape.num_attention_heads) % 2:
            problems.append(f"{path}: the head size hidden_size/num_attention_heads must be even (RoPE)")
        if shape.num_attention_heads % shape.kv_heads:
            problems.append(f"{path}: num_attention_heads must divide by num_key_value_heads={shape.kv_heads}")
    if problems:
        raise ConfigError(problems)
    return shape


def resolve_impl(impl: str) -> str:
    has_hf = importlib.util.find_spec("transformers") is not None
    if impl == "auto":
        return "hf" if has_hf else "native"
    if impl == "hf" and not has_hf:
        raise ConfigError("model.impl='hf': transformers is not installed (pip install 'distopt[hf]'), or use model.impl=native")
    return impl


def build_model(shape: ModelShape, impl: str, *, activation_checkpointing: bool = False) -> nn.Module:
    """A freshly initialized model on the current default device (use ``torch.device('meta')``
    as a context to build one without memory)."""
    if impl == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        # transformers 5 takes rope_theta and attn_implementation as extra keywords its signature does not list.
        config = LlamaConfig(  # type: ignore[call-arg, unused-ignore]
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_position_embeddings,
            rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, tie_word_embeddings=shape.tie_word_embeddings,
            initializer_range=shape.initializer_range, use_cache=False, attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from distopt.models import LlamaShape, TinyLlama

    if activation_checkpointing:
        raise ConfigError("model.activation_checkpointing=true needs model.impl=hf")
    return TinyLlama(LlamaShape(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads or None, max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta, tie_word_embeddings=shape.tie_word_embeddings,
    ))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def lm_loss(model: nn.Module, window: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a ``batch x (seq_len + 1)`` window, in fp32."""
    ids, targets = window[:, :-1], window[:, 1:]
    logits = logits_of(model, ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
