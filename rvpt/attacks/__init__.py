"""Backdoor attacks as a registry: ``make_attack("badnet", image_size=32, seed=0)``.

Adding an attack is one module with a ``@register_attack("name")`` class, imported here.
"""
from .base import (ATTACK_FILE, ATTACKS, Attack, AttackError, AttackParams, get_attack,
                   load_attack, make_attack, register_attack, scaled)
from . import blend, issba, optimized, patch  # noqa: F401  (register)

__all__ = ["ATTACK_FILE", "ATTACKS", "Attack", "AttackError", "AttackParams", "get_attack",
           "load_attack", "make_attack", "register_attack", "scaled"]
