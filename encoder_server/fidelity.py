"""How close two ``[B, L, D]`` embedding batches are, over the prompts' real rows.

Used by tests/encoder_server/test_packed.py and the benchmarks to compare ``compute="packed"``
with the reference and to measure the reference's own noise. Only the rows at
real-token positions are compared (``mask``); with left padding a packed batch's
pad rows come from the pad table and are compared separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
"""Explicit mantissa bits per dtype: one ulp of ``x`` is ``2 ** (floor(log2 |x|) - bits)``."""


@dataclass(frozen=True)
class Fidelity:
    """Agreement of ``candidate`` with ``reference`` over the compared rows.

    Attributes:
        max_abs: largest absolute difference of any element.
        mean_abs: mean absolute difference over all compared elements.
        max_row_ulp: the largest difference in a row, in ulps of that row's largest
            reference element (ulps of the coarser of the two dtypes), the worst row. "Within one ulp
            of the row's scale" is below 1. (Per-element ulps are not used: near zero a
            difference far below the row's resolution counts as millions of ulps.)
        cos_min: smallest cosine similarity of a candidate row with its reference row (float64).
        identical_rows: share of rows that are bit-identical.
        rows: how many rows were compared.
    """

    max_abs: float
    mean_abs: float
    max_row_ulp: float
    cos_min: float
    identical_rows: float
    rows: int

    def cells(self) -> str:
        """Markdown table cells: max abs | mean abs | max row ulp | min cosine | identical rows."""
        return (
            f"{self.max_abs:.3g} | {self.mean_abs:.3g} | {self.max_row_ulp:.3g} | {self.cos_min:.9f} | "
            f"{100 * self.identical_rows:.1f}% of {self.rows}"
        )


def row_ulp(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp, in ``dtype``, of each row's largest magnitude: ``[N, D] -> [N]`` (float64)."""
    scale = rows.double().abs().amax(dim=-1)
    _, exponent = torch.frexp(scale)  # scale = m * 2**e, 0.5 <= m < 1, so floor(log2 scale) = e - 1
    return torch.ldexp(torch.ones_like(scale), exponent - 1 - MANTISSA_BITS[dtype])


def compare(candidate: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> Fidelity:
    """:class:`Fidelity` of ``candidate`` against ``reference`` (both ``[B, L, D]``).

    ``mask`` (``[B, L]``, true at real tokens) picks the rows compared; all rows without it.
    Row ulps are counted in the coarser of the two dtypes (bf16 against an fp32 reference: bf16 ulps).
    """
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    if mask is None:
        mask = torch.ones(reference.shape[:2], dtype=torch.bool)
    mask = mask.bool()
    coarser = min(candidate.dtype, reference.dtype, key=MANTISSA_BITS.__getitem__)
    c, r = candidate[mask].double(), reference[mask]  # [rows, D]
    if r.shape[0] == 0:
        return Fidelity(0.0, 0.0, 0.0, 1.0, 1.0, 0)
    diff = (c - r.double()).abs()
    cos = torch.nn.functional.cosine_similarity(c, r.double(), dim=-1)
    return Fidelity(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_row_ulp=float((diff.amax(dim=-1) / row_ulp(r, coarser)).max()),
        cos_min=float(cos.min()),
        identical_rows=float((candidate[mask] == reference[mask]).all(dim=-1).double().mean()),
        rows=int(r.shape[0]),
    )
