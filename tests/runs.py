"""Training runs in tests: launching two processes, reading log.jsonl."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def training_log(out: str | Path, timed: bool = True) -> list[dict]:
    """The training rows of OUT/log.jsonl (validation rows dropped); timed=False also drops queries_per_s, the one
    column that differs between two otherwise identical runs."""
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    drop = set() if timed else {"queries_per_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if "split" not in r]


def launch_two(config: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`vlm-depth ARGS` in 2 processes under `accelerate launch --config_file launch/CONFIG` (a shipped
    config). accelerate 1.15's `--cpu` launcher starts one process unless MPI is set up; the multi-GPU launch is
    torchrun, and without CUDA the run's Accelerator(cpu=True) trains over gloo on the CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config)]
    launch += ["--num_processes", "2", "--main_process_port", str(port), "-m", "vlm_depth"]
    return subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
