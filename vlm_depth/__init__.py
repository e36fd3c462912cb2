"""vlm-depth: metric depth completion with a vision-language model (Qwen2.5-VL).

Stable Python API: `DepthVLM`, `DepthProcessor`, `load_model`, `complete` (imported lazily so `import vlm_depth`
stays light).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DepthVLM": "vlm_depth.model.depth_vlm",
    "DepthProcessor": "vlm_depth.model.processor",
    "load_model": "vlm_depth.model.loading",
    "complete": "vlm_depth.infer.complete",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm_depth' has no attribute {name!r}")


__all__ = ["DepthVLM", "DepthProcessor", "load_model", "complete", "__version__"]
