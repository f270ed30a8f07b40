"""Built-in training presets (YAML files read by ``pldr-llm train --preset NAME``)."""

from __future__ import annotations

from typing import Any

from pldr_llm.core.errors import PLDRError

PRESETS = ("tiny", "paper-110m", "pldr-350m", "pldr-1b")


def load_preset(name: str) -> dict[str, Any]:
    """The built-in preset ``name`` as a dict of sections."""
    from importlib import resources

    if name not in PRESETS:
        raise PLDRError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("pldr_llm.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    import yaml

    return yaml.safe_load(text) or {}
