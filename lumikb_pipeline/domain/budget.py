"""The spending budget of a job (`lumikb reextract --max-cost`)."""

from __future__ import annotations

import math

from lumikb_pipeline.core.errors import UsageError


def check_max_cost(max_cost: float | None) -> float | None:
    """`max_cost` when it is a budget (a finite number of USD, 0 or more) or None; UsageError otherwise."""
    if max_cost is None:
        return None
    if not math.isfinite(max_cost):
        raise UsageError(f"--max-cost {max_cost} is not a number of USD; give a finite budget, e.g. --max-cost 5")
    if max_cost < 0:
        raise UsageError(f"--max-cost {max_cost:g} is negative; give a budget in USD of 0 or more, e.g. --max-cost 5")
    return max_cost
