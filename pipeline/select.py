"""Selection rules: which trial of a sweep counts as "best". Higher score is better.

- ``ca``: clean accuracy, ``score = ca``. The only rule a real defender can apply: they hold clean
  validation data but neither the trigger nor the target, so they cannot measure ASR. (The sweep may
  pass its defender-visible ``val_ca`` here as ``ca``.)
- ``asr``: ``score = -asr``. An oracle that knows the attack; for research (how good can the defense
  get, and how far is the defender's choice from it), never for deployment.
- ``combo``: ``score = ca - weight * asr``. Also needs the oracle ASR; ``weight`` trades them off.

A missing, ``None`` or NaN metric that the rule needs gives ``-inf``: such a trial is never chosen
over one with a real score.
"""
from __future__ import annotations

import math
from typing import Mapping

RULES = ("ca", "asr", "combo")


def _value(metrics: Mapping, key: str) -> float:
    v = metrics.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def score(metrics: Mapping, rule: str, weight: float = 1.0) -> float:
    """The score of one trial's ``metrics`` (``ca``, ``asr``, ...) under ``rule``; higher is better."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(RULES)}")
    ca, asr = _value(metrics, "ca"), _value(metrics, "asr")
    if rule == "ca":
        s = ca
    elif rule == "asr":
        s = -asr
    else:
        s = ca - weight * asr
    return -math.inf if math.isnan(s) else s


def describe(rule: str, weight: float = 1.0) -> str:
    """One line saying what ``rule`` maximises and who can use it."""
    score({}, rule, weight)
    return {"ca": "score = CA (defender-visible)",
            "asr": "score = -ASR (oracle: needs the attack)",
            "combo": f"score = CA - {weight:g} * ASR (oracle: needs the attack)"}[rule]
