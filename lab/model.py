"""A small GPT-style decoder-only transformer, GPU-capable and meta-device friendly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "PRESETS",
    "ToyTransformer",
    "default_device",
    "get_preset",
    "lm_loss",
]

IGNORE_INDEX = -100  # target value for positions that carry no loss (prompt and padding)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a ToyTransformer. Defaults are the lab's CPU size (`PRESETS["cpu"]`)."""

    vocab_size: int = 64  # the lab's character vocabulary (51 symbols) padded to a multiple of 16
    d_model: int = 128  # residual width; every projection of q/k/v/o is d_model x d_model
    n_layers: int = 2  # enough depth for the lab's algorithmic tasks, quick on a 2-core CPU
    n_heads: int = 4  # head size 32
    d_ff: int = 512  # MLP hidden width, the usual 4 x d_model
    max_seq_len: int = 32  # longest task sequence (prompt + answer) is 24 tokens
    dropout: float = 0.0  # model dropout; LoRA's own adapter dropout is set in add_lora
    bias: bool = False  # no biases in linears, as in many modern LLMs; counts match the LoRA paper

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if not isinstance(self.dropout, int | float) or isinstance(self.dropout, bool):
            raise ValueError(f"ModelConfig.dropout={self.dropout!r}: expected a number in [0, 1)")
        if not isinstance(self.bias, bool):
            raise ValueError(f"ModelConfig.bias={self.bias!r}: expected True or False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout!r}: expected a value in [0, 1)")

    def to_dict(self) -> dict:
        """The config as a plain dict (for JSON)."""
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: builds and trains in milliseconds
    "tiny": ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64),
    # the lab's shipped base model: a few seconds per hundred steps on a 2-core CPU
    "cpu": ModelConfig(),
    # a wider, deeper toy for a GPU: same tasks, enough work to keep an accelerator busy
    "gpu": ModelConfig(d_model=1024, n_layers=8, n_heads=16, d_ff=4096),
    # GPT-2 small's shapes (124M parameters), for counting on the meta device
    "gpt2-small": ModelConfig(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024
    ),
    # GPT-3 175B's shapes (LoRA paper, Table 4), for counting on the meta device only
    "gpt3-175b": ModelConfig(
        vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=49152, max_seq_len=2048
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def default_device() -> torch.device:
    """The best available device: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/o projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, b = config.d_model, config.bias
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(d, d, bias=b)
        self.k_proj = nn.Linear(d, d, bias=b)
        self.v_proj = nn.Linear(d, d, bias=b)
        self.o_proj = nn.Linear(d, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d_model) -> (batch, seq, d_model)."""
        bsz, seq, d = x.shape
        h = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, seq, h, d // h).transpose(1, 2)  # (batch, heads, seq, head_dim)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seq, d))


class MLP(nn.Module):
    """Position-wise feed-forward block: up_proj -> GELU -> down_proj."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ToyTransformer(nn.Module):
    """GPT-style decoder-only language model; the output head is tied to the token embedding."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        if config is not None and not isinstance(config, ModelConfig):
            raise TypeError(
                f"config must be a ModelConfig (e.g. get_preset('tiny')), "
                f"got {type(config).__name__}"
            )
        super().__init__()
        self.config = config = config or ModelConfig()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: one matrix, counted once
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * n_layers)."""
        if self.tok_emb.weight.is_meta:
            return  # shapes only: nothing to initialise
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, seq) -> next-token logits (batch, seq, vocab_size)."""
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.is_floating_point():
            got = (
                f"a {tuple(idx.shape)} {idx.dtype} tensor"
                if isinstance(idx, torch.Tensor)
                else type(idx).__name__
            )
            raise TypeError(f"idx must be a (batch, seq) tensor of integer token ids, got {got}")
        seq = idx.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(seq, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target is not IGNORE_INDEX.

    reduction="none" gives every position's loss instead, (batch * seq,), 0 where ignored.

    logits: (batch, seq, vocab); targets: (batch, seq) token ids or IGNORE_INDEX. Half-precision
    logits are upcast to float32; float64 logits stay float64.
    """
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
