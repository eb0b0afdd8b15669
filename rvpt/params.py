"""Typed parameters shared by the attack and defense registries."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


def parse_params(model: type[BaseModel], params: dict[str, Any], owner: str,
                 error: type[Exception]) -> BaseModel:
    """Validate ``params`` into ``model``; a bad one raises ``error`` with one line naming
    ``owner`` and the field."""
    try:
        return model(**params)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "params"
        raise error(f"{owner}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
