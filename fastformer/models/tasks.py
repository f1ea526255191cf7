"""Synthetic sequence-to-sequence tasks on digit strings, for training and testing the model.

A source is 1 to max_digits random digits; the target is the reversed ("reverse"), sorted
("sort") or same ("copy") digits. Tokens: 0 padding, 1 BOS, 2 EOS, 3 + d for digit d.

Held-out sequences are never trained on: a hash of each digit string puts about 10% of
all strings in the held-out split, and training batches are drawn from the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["TASKS", "Batch", "DigitTask"]

TASKS = ("reverse", "sort", "copy")
PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3
Split = Literal["train", "held_out"]


class Batch(NamedTuple):
    src: Tensor  # (B, max_digits): digit tokens, then padding
    tgt: Tensor  # (B, max_digits + 2): BOS, the answer's digit tokens, EOS, padding


@dataclass(frozen=True)
class DigitTask:
    name: str = "reverse"
    min_digits: int = 1
    max_digits: int = 12

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.name!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )

    vocab_size = DIGIT0 + 10
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    @property
    def max_len(self) -> int:
        """Positions the model needs: max_digits source tokens, max_digits + 1 decoder inputs."""
        return self.max_digits + 2

    def _candidates(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """size random strings: digits (size, max_digits) and a validity mask of the same."""
        lengths = torch.randint(self.min_digits, self.max_digits + 1, (size,), generator=generator)
        digits = torch.randint(0, 10, (size, self.max_digits), generator=generator)
        valid = torch.arange(self.max_digits) < lengths[:, None]  # (size, max_digits)
        return digits.masked_fill(~valid, 0), valid

    def _held_out(self, digits: Tensor, valid: Tensor) -> Tensor:
        """True for the ~10% of strings in the held-out split: a multiplicative hash of the
        string read as a base-11 number (digit + 1 per position, 0 past the end)."""
        places = 11 ** torch.arange(self.max_digits, dtype=torch.int64)
        code = ((digits + 1) * valid * places).sum(-1)  # (size,) distinct per string
        mixed = code * 6364136223846793005  # wraps around int64, which is fine for a hash
        return ((mixed >> 33) & 1023) < 102

    def _answer(self, digits: Tensor, valid: Tensor) -> Tensor:
        """The target digits (size, max_digits), left-aligned like the source."""
        if self.name == "copy":
            return digits
        if self.name == "sort":
            # Past-the-end positions sort last as 10s, then are masked away again.
            return digits.masked_fill(~valid, 10).sort(dim=-1).values.masked_fill(~valid, 0)
        # reverse: position i takes digit length - 1 - i
        lengths = valid.sum(-1, keepdim=True)  # (size, 1)
        index = (lengths - 1 - torch.arange(self.max_digits)).clamp(min=0)
        return digits.gather(1, index)

    def sample(self, size: int, generator: torch.Generator, split: Split = "train") -> Batch:
        """size examples of one split (held-out ones may repeat; see held_out_set)."""
        picked_digits, picked_valid, have = [], [], 0
        while have < size:
            digits, valid = self._candidates(2 * size + 16, generator)
            keep = self._held_out(digits, valid)
            keep = keep if split == "held_out" else ~keep
            picked_digits.append(digits[keep])
            picked_valid.append(valid[keep])
            have += int(keep.sum())
        digits = torch.cat(picked_digits)[:size]
        valid = torch.cat(picked_valid)[:size]
        return self._encode(digits, valid)

    def held_out_set(self, size: int, seed: int) -> Batch:
        """size distinct held-out examples (fewer if the split has fewer strings)."""
        generator = torch.Generator().manual_seed(seed)
        batch = self.sample(4 * size, generator, "held_out")
        src, first = _unique_rows(batch.src)
        return Batch(src[:size], batch.tgt[first][:size])

    def _encode(self, digits: Tensor, valid: Tensor) -> Batch:
        size = digits.shape[0]
        src = torch.where(valid, digits + DIGIT0, PAD)
        answer = torch.where(valid, self._answer(digits, valid) + DIGIT0, PAD)
        tgt = torch.full((size, self.max_digits + 2), PAD, dtype=torch.long)
        tgt[:, 0] = BOS
        tgt[:, 1:-1] = answer
        tgt[torch.arange(size), valid.sum(-1) + 1] = EOS  # right after the last digit
        return Batch(src, tgt)

    def exact_match(self, generated: Tensor, tgt: Tensor) -> Tensor:
        """(B,) bool: the generated tokens (B, N) (no BOS, padding after EOS) equal the
        target's answer and EOS."""
        expected = tgt[:, 1:]  # (B, max_digits + 1)
        width = expected.shape[1]
        if generated.shape[1] < width:
            pad = generated.new_full((generated.shape[0], width - generated.shape[1]), PAD)
            generated = torch.cat([generated, pad], dim=1)
        # Anything generated past the expected width must be padding.
        beyond = (generated[:, width:] != PAD).any(-1)
        return (generated[:, :width] == expected).all(-1) & ~beyond


def _unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows in order of first appearance, and the index of each in rows."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    first = first.sort().values
    return rows[first], first
