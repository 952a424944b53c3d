"""Base class of every typed config: frozen, validated, unknown keys rejected by name.

Derived quantities are properties computed from the fields, never stored twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config value that is missing, unknown or out of range; the message names the field."""


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "config") -> Self:
        """Validate a dict, turning pydantic's report into one readable ConfigError."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = []
            for e in err.errors():
                field = ".".join(str(p) for p in e["loc"]) or "(root)"
                lines.append(f"{where}: field '{field}': {e['msg']} (got {e.get('input')!r})")
            raise ConfigError("\n".join(lines)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.parse(json.loads(path.read_text()), where=str(path))
