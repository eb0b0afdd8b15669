"""Defenses as a registry: ``make_defense("rvpt", loaded, class_names, templates, seed=0)``.

Adding one is a module with a ``@register_defense("name")`` class, imported here.
"""
from .base import (DEFENSES, Defense, DefenseError, DefenseParams, TrainHistory, TrainParams,
                   get_defense, lr_at, register_defense, train_defense)
from . import prompt  # noqa: F401  (register)


def make_defense(name: str, loaded, class_names, templates=("a photo of a {}.",), seed: int = 0,
                 **params) -> Defense:
    return get_defense(name)(loaded, class_names, templates, seed, **params)


__all__ = ["DEFENSES", "Defense", "DefenseError", "DefenseParams", "TrainHistory", "TrainParams",
           "get_defense", "lr_at", "make_defense", "register_defense", "train_defense"]
