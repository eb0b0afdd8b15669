"""Plain-text tables and cells for what the jobs print (no imports beyond the standard library)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cols = list(zip(*([tuple(header)] + [tuple(str(c) for c in r) for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pct(v: Optional[float]) -> str:
    """A rate as a percentage with two decimals; ``-`` when missing."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def num(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def cell(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def read_line(split: str, read: dict) -> str:
    """``read test: 40 valid, 8 skipped (cls: missing 5, ...)``: what a reader kept and skipped."""
    from rvpt.shards import ReadStats

    return f"read {split}: {ReadStats.from_dict(read).line()}"
