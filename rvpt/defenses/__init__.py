"""Defenses as a registry: ``make_defense("rvpt", loaded, class_names, templates, seed=0)``.

Adding one is a module in this package with a ``@register_defense("name")`` class: every module
here is imported (and so registered) with the package. A defense defined elsewhere registers when
its module is imported; the sweep's workers import it by name (``defense_modules``).
"""
import importlib
import pkgutil

from .base import (DEFENSES, Defense, DefenseError, DefenseParams, TrainHistory, TrainOverrides,
                   TrainParams, defense_modules, get_defense, import_defenses, lr_at,
                   register_defense, train_defense)

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")  # registers its defenses


def make_defense(name: str, loaded, class_names, templates=("a photo of a {}.",), seed: int = 0,
                 **params) -> Defense:
    return get_defense(name)(loaded, class_names, templates, seed, **params)


__all__ = ["DEFENSES", "Defense", "DefenseError", "DefenseParams", "TrainHistory", "TrainOverrides",
           "TrainParams", "defense_modules", "import_defenses",
           "get_defense", "lr_at", "make_defense", "register_defense", "train_defense"]
