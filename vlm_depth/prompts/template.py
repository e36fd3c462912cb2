"""Prompt templates: the strings of one template and the rules for its placeholders.

Templates are YAML files in the top-level `prompts/` folder (`paper` is the default, verbatim from the paper):
`fill`, `keep` (may hold `{x}`, the given depth), `question`, `answer` (exactly one `{y}`, the depth), and per
query mode the pixel identification: `coords` (with `{u}` = column and `{v}` = row on the processor's resized image
grid, Qwen2.5-VL's absolute-coordinate convention) and `pointer` (with `{pointer}`, the pointer token). Optional
`instruction`: shared text placed once after the image.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from vlm_depth.errors import ConfigError
from vlm_depth.resources import load_yaml, resource_path

# Placeholder -> (template keys that must hold it exactly once, keys that may hold it at most once).
_PLACEHOLDERS = {
    "{y}": (("answer",), ()),
    "{x}": ((), ("keep",)),
    "{u}": (("coords",), ()),
    "{v}": (("coords",), ()),
    "{pointer}": (("pointer",), ()),
}


@dataclass(frozen=True)
class PromptTemplate:
    """The strings of one prompt template (see the module docstring for the placeholders)."""

    name: str
    fill: str
    keep: str
    question: str
    answer: str
    instruction: str = ""
    coords: str = ""
    pointer: str = ""

    @classmethod
    def load(cls, name_or_path: str | Path) -> PromptTemplate:
        """Template by name (`paper`, `no_prompt`, `mask_only`, ...) from `prompts/`, or from a YAML file path."""
        path = resource_path("prompts", str(name_or_path))
        data = load_yaml(path)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        missing = [k for k in ("name", "fill", "keep", "question", "answer") if k not in data]
        if unknown or missing:
            raise ConfigError(f"{path}: unknown keys {unknown}, missing keys {missing}; known keys: {known}")
        not_text = sorted(k for k, v in data.items() if not isinstance(v, str))
        if not_text:
            raise ConfigError(f"{path}: keys {not_text} must be strings (quote them)")
        template = cls(**data)
        template.validate(str(path))
        return template

    def validate(self, where: str = "") -> None:
        """ConfigError if a placeholder is missing, repeated or in a key where it would leak or mean nothing."""
        where = where or f"template {self.name!r}"
        for holder, (required, allowed) in _PLACEHOLDERS.items():
            for f in fields(self):
                text = getattr(self, f.name)
                count = text.count(holder)
                if f.name in required and text and count != 1:
                    raise ConfigError(f"{where}: `{f.name}` must contain {holder} exactly once")
                if f.name not in required and f.name not in allowed and count:
                    raise ConfigError(f"{where}: {holder} is not allowed in `{f.name}`")
                if f.name in allowed and count > 1:
                    raise ConfigError(f"{where}: `{f.name}` may contain {holder} at most once")
        if not self.answer:
            raise ConfigError(f"{where}: `answer` must contain {{y}} exactly once")
