"""`vlm-depth bench decoder|train`: dispatch to the decoder or the training benchmark; both return a JSON summary."""

from __future__ import annotations

from typing import Any

from vlm_depth.config import BenchConfig, save_config
from vlm_depth.errors import ConfigError


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark `cfg.what` (`decoder` or `train`); writes `bench_WHAT.json` and the config to `cfg.out`."""
    if cfg.what == "decoder":
        from vlm_depth.infer.bench import bench_decoder as bench
    elif cfg.what == "train":
        from vlm_depth.train.bench import bench_train as bench
    else:
        raise ConfigError(f"bench: unknown benchmark {cfg.what!r}; choose decoder or train")
    result = bench(cfg)
    if cfg.out:
        import json
        from pathlib import Path

        save_config(cfg.out, cfg)
        (Path(cfg.out) / f"bench_{cfg.what}.json").write_text(json.dumps(result, indent=2))
    return result
