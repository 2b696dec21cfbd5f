"""Code-LM task: byte-level sequences from Python's standard library sources.

The provider's corpus is stdlib Python code plus a slice of English prose (the reference manual's
topic texts shipped in ``pydoc_data/topics.py``); the deletion request names the prose. methods.md:
a forget slice in the same language as the rest (email/http code) is not isolated in any set of weights,
so a mask lowers it no more than a random mask; a different register is what a mask can remove.
The client personalizes on ``tkinter`` sources (``idlelib``/``asyncio`` where an interpreter
ships without tkinter), which the provider never trains on.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from zkunlearn.tasks.data import DataError, Variant

# The client's slice: the first of these packages the interpreter ships (some builds drop tkinter).
CLIENT_CANDIDATES = ("tkinter", "idlelib", "asyncio")
# Folders never used as provider code: the forget slice, the client candidates and huge test suites.
_EXCLUDED = ("pydoc_data", *CLIENT_CANDIDATES, "test", "site-packages", "lib2to3", "turtledemo")


@dataclass(frozen=True)
class Sequences:
    """Token windows (N, T+1): inputs are ``[:, :-1]``, next-byte targets ``[:, 1:]``."""

    tokens: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def x(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def y(self) -> Tensor:
        return self.tokens[:, 1:]


@dataclass(frozen=True)
class CodeTask:
    """Splits of the code-LM task. ``client_is_forget`` marks the client's prose windows (overlap only)."""

    seed: int
    variant: Variant
    retain: Sequences
    forget: Sequences
    code_test: Sequences
    forget_test: Sequences
    client_train: Sequences
    client_test: Sequences
    client_is_forget: Tensor

    @property
    def provider_train(self) -> Sequences:
        return Sequences(torch.cat([self.retain.tokens, self.forget.tokens]))

    @property
    def client_after_request(self) -> Sequences:
        return Sequences(self.client_train.tokens[~self.client_is_forget])


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "pydoc_data" / "topics.py").exists():
        raise DataError(f"Python standard library sources not found under {path}")
    return path


def _code_text(root: Path, folders: tuple[str, ...] | None) -> bytes:
    """Concatenated sources: the top level and its packages (minus exclusions), or only ``folders``."""
    if folders is None:
        files = [p for p in sorted(root.rglob("*.py")) if not set(p.relative_to(root).parts) & set(_EXCLUDED)]
    else:
        files = [p for f in folders for p in sorted((root / f).rglob("*.py"))]
    return b"\n".join(p.read_bytes() for p in files)


def _prose_text(root: Path) -> bytes:
    """The topic texts as plain bytes (the file is a dict literal of strings; read it without importing)."""
    import ast

    tree = ast.parse((root / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    texts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 200
    ]
    return "\n".join(texts).encode("utf-8")


def _windows(blob: bytes, n: int, length: int, gen: torch.Generator) -> Tensor:
    """``n`` random windows of ``length`` bytes from ``blob``."""
    if len(blob) <= length:
        raise DataError(f"text of {len(blob)} bytes is too short for windows of {length}")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.long)
    starts = torch.randint(0, len(blob) - length, (n,), generator=gen)
    return data[starts.unsqueeze(1) + torch.arange(length)]


def make_code_task(
    seed: int,
    variant: Variant = "disjoint",
    *,
    context: int = 64,
    n_retain: int = 6000,
    n_forget: int = 1500,
    n_client: int = 1500,
    n_test: int = 500,
    n_client_forget: int = 300,
) -> CodeTask:
    """Draw windows from disjoint byte ranges (first 80 % train, last 20 % test) of each text.

    In the ``overlap`` variant the client's training set also holds ``n_client_forget`` prose windows.
    """
    root = stdlib_dir()
    gen = torch.Generator().manual_seed(seed)
    length = context + 1
    code, prose = _code_text(root, None), _prose_text(root)
    client = b""
    for name in CLIENT_CANDIDATES:
        if (root / name).is_dir():
            client = _code_text(root, (name,))
            if len(client) > 100_000:
                break
    if len(client) <= 100_000:
        raise DataError(f"none of {CLIENT_CANDIDATES} under {root} has enough source for the client slice")

    def halves(blob: bytes) -> tuple[bytes, bytes]:
        cut = int(len(blob) * 0.8)
        return blob[:cut], blob[cut:]

    code_tr, code_te = halves(code)
    prose_tr, prose_te = halves(prose)
    client_tr, client_te = halves(client)
    client_tokens = _windows(client_tr, n_client, length, gen)
    is_forget = torch.zeros(n_client, dtype=torch.bool)
    if variant == "overlap":
        extra = _windows(prose_tr, n_client_forget, length, gen)
        client_tokens = torch.cat([client_tokens, extra])
        is_forget = torch.cat([is_forget, torch.ones(n_client_forget, dtype=torch.bool)])
    elif variant != "disjoint":
        raise DataError(f"unknown variant {variant!r}; expected 'disjoint' or 'overlap'")
    return CodeTask(
        seed=seed,
        variant=variant,
        retain=Sequences(_windows(code_tr, n_retain, length, gen)),
        forget=Sequences(_windows(prose_tr, n_forget, length, gen)),
        code_test=Sequences(_windows(code_te, n_test, length, gen)),
        forget_test=Sequences(_windows(prose_te, n_test, length, gen)),
        client_train=Sequences(client_tokens),
        client_test=Sequences(_windows(client_te, n_test, length, gen)),
        client_is_forget=is_forget,
    )
