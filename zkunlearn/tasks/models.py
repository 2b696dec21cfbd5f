"""Small native-torch models whose masked layers are plain ``nn.Linear`` modules.

Group-OBS works per weight matrix, so each model names its target layers (``masked_layers``): the
MLP's hidden layer, the ViT's ``fc1`` of every block, the code LM's ``fc1`` of every decoder layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from zkunlearn.errors import MalformedError


class ModelError(MalformedError):
    """A model configuration that cannot be built."""


class Classifier(Protocol):
    """An image classifier that also exposes its penultimate features (for the analytic head)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MLPConfig:
    in_dim: int = 784
    hidden: int = 256
    n_classes: int = 10

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "mlp", **asdict(self)}


class MLP(nn.Module):
    """784 -> hidden -> hidden -> classes; ``fc2`` (hidden x hidden) is the masked layer."""

    masked_layers: tuple[str, ...] = ("fc2",)

    def __init__(self, config: MLPConfig = MLPConfig()) -> None:
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.in_dim, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.hidden)
        self.head = nn.Linear(config.hidden, config.n_classes)
        self.act = nn.ReLU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x.flatten(1)))
        out: Tensor = self.act(self.fc2(h))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Tensor = self.head(self.features(x))
        return out


@dataclass(frozen=True)
class ViTConfig:
    image: int = 28
    patch: int = 7
    channels: int = 1
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    n_classes: int = 10

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "vit", **asdict(self)}


class Block(nn.Module):
    """Pre-norm transformer block; its MLP keeps ``fc1``/``fc2`` names so masks can target ``fc1``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # Plain matmul attention: vmap (per-sample gradients) has batching rules for all of it.
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        out: Tensor = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return out


class ViT(nn.Module):
    """A small vision transformer: 7x7 patches of a 28x28 image give 16 tokens plus a class token."""

    def __init__(self, config: ViTConfig = ViTConfig()) -> None:
        super().__init__()
        if config.image % config.patch:
            raise ModelError(f"image size {config.image} is not a multiple of patch {config.patch}")
        if config.width % config.heads:
            raise ModelError(f"width {config.width} is not a multiple of heads {config.heads}")
        self.config = config
        n_tokens = (config.image // config.patch) ** 2
        self.embed = nn.Linear(config.channels * config.patch**2, config.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio * config.width) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.n_classes)

    @property
    def masked_layers(self) -> tuple[str, ...]:
        return tuple(f"blocks.{i}.fc1" for i in range(self.config.depth))

    @property
    def refit_pairs(self) -> tuple[tuple[str, str, str], ...]:
        """(masked layer, the layer its activations feed, activation) for the client's output refit."""
        return tuple((f"blocks.{i}.fc1", f"blocks.{i}.fc2", "gelu") for i in range(self.config.depth))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch
        n, c = x.shape[0], x.shape[1]
        tiles = x.unfold(2, p, p).unfold(3, p, p)  # (N, C, H/p, W/p, p, p)
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c * p * p)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patches(x))
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return torch.as_tensor(self.norm(tokens[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Tensor = self.head(self.features(x))
        return out


@dataclass(frozen=True)
class CodeLMConfig:
    """A tiny OPT: byte vocabulary (256) plus pad/bos/eos/unk specials."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    ffn: int = 256
    context: int = 64

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "code-lm", **asdict(self)}


BYTE_VOCAB = 256
PAD, BOS, EOS, UNK = 256, 257, 258, 259
VOCAB_SIZE = 260


class CodeLM(nn.Module):
    """A tiny OPT from ``transformers.OPTConfig`` with random weights (nothing from a hub).

    ``forward`` returns plain logits so the LM trains, masks and takes per-sample gradients through
    the same code paths as the image classifiers.
    """

    def __init__(self, config: CodeLMConfig = CodeLMConfig()) -> None:
        super().__init__()
        from transformers import OPTConfig, OPTForCausalLM

        self.config = config
        cfg = OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.hidden,
            num_hidden_layers=config.layers,
            ffn_dim=config.ffn,
            num_attention_heads=config.heads,
            max_position_embeddings=config.context + 2,
            word_embed_proj_dim=config.hidden,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            enable_bias=True,
            do_layer_norm_before=True,
        )
        self.lm = OPTForCausalLM(cfg)

    @property
    def masked_layers(self) -> tuple[str, ...]:
        return tuple(f"lm.model.decoder.layers.{i}.fc1" for i in range(self.config.layers))

    @property
    def refit_pairs(self) -> tuple[tuple[str, str, str], ...]:
        """(masked layer, the layer its activations feed, activation): OPT's MLP is fc1 -> ReLU -> fc2."""
        prefix = "lm.model.decoder.layers"
        return tuple((f"{prefix}.{i}.fc1", f"{prefix}.{i}.fc2", "relu") for i in range(self.config.layers))

    def forward(self, ids: Tensor) -> Tensor:
        return torch.as_tensor(self.lm(input_ids=ids, use_cache=False).logits)


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The named ``nn.Linear`` submodule, with a clear error if the name points elsewhere."""
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ModelError(f"model has no submodule {name!r}") from exc
    if not isinstance(module, nn.Linear):
        raise ModelError(f"submodule {name!r} is a {type(module).__name__}, not nn.Linear")
    return module


def masked_weight_count(model: nn.Module, layers: tuple[str, ...]) -> int:
    return sum(get_linear(model, name).weight.numel() for name in layers)
