"""SIGKILL a 40-step tiny training run at many points and resume it with `--resume_from latest` each time: the run
must end bit-identical to one that was never interrupted (issue 16, "nothing lost").

Every invocation is the same command, `vlm-depth train ... --model tiny --resume_from latest`, as a preemptible job
would issue it: the first one builds OUT/tiny-base, later ones continue from the newest checkpoint (or from step 0
when there is none yet). Compared with the uninterrupted run: every tensor of every safetensors file in final/ and
in the last checkpoint (torch.equal, no tolerance) and every logged training row (exact floats).

Two tests:
- `test_sigkill_at_named_points` uses the package's one test hook (`vlm_depth.files.fault_point`): the environment
  variable VLM_DEPTH_FAULT=POINT makes the training process SIGKILL itself when it reaches POINT:
      tiny-base      build_tiny_checkpoint: after the weights are written, before tokenizer/processor/config
      step@N         after the optimiser update of step N, before its log row is written
      log@N          half-way through log row N: the first half written and flushed, then the kill (a torn line)
      checkpoint@N   save_checkpoint(N): state files written to the temporary folder, before the rename
      prune@N        save_checkpoint(N): after the rename, before older checkpoints are pruned
      final          save_final: temporary final folder written, before the rename
  A point that is never reached leaves the run alive and fails the test.
- `test_sigkill_at_random_moments` needs no hook: it watches OUT from outside (OUT/tiny-base appearing, the number
  of rows in log.jsonl) and sends SIGKILL a random 0-150 ms after the trigger, so it also hits checkpoint writes
  and log appends at unplanned moments. Seeded by VLM_DEPTH_KILL_SEED (default 0; printed on failure).

Cost: about 7 s per process start on one thread (imports, tiny model, 40 steps of 48x64 images at ~0.1 s), so
about 2 minutes for both tests on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import training_log
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train" / "tiny-synthetic.yaml"
STEPS, SAVE_EVERY = 40, 5
FAULT_ENV = "VLM_DEPTH_FAULT"
SEED = int(os.environ.get("VLM_DEPTH_KILL_SEED", "0"))
START_TIMEOUT_S = 180  # one process: imports + tiny base + 40 steps take ~10 s; generous for a loaded CI machine


def train_command(out: Path) -> list[str]:
    # LoRA with dropout: a resume must also restore the RNG that draws the dropout masks
    return [
        sys.executable, "-m", "vlm_depth", "train", "--config", str(RECIPE), "--model", "tiny",
        "--dataset", "synthetic:8?height=48&width=64&seed=0", "--val_dataset", "", "--queries_per_image", "4",
        "--batch_size", "1", "--finetune", "lora", "--lora_dropout", "0.1", "--lr_backbone", "1e-3",
        "--max_steps", str(STEPS), "--save_every", str(SAVE_EVERY), "--keep_checkpoints", "2",
        "--num_threads", "1", "--log_every", "1000", "--resume_from", "latest", "--out", str(out),
    ]  # fmt: skip


def environment(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


def start(out: Path, fault: str | None, attempt: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}-attempt{attempt:02d}.log"
    return subprocess.Popen(
        train_command(out), env=environment(fault), stdout=logs.open("w"), stderr=subprocess.STDOUT, cwd=out.parent
    )


def wait(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code of `proc`; a process still running after `timeout` seconds is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"training process still running after {timeout} s")


def tail(out: Path, attempt: int) -> str:
    path = out.parent / f"{out.name}-attempt{attempt:02d}.log"
    return path.read_text()[-3000:] if path.is_file() else ""


def finish(out: Path, attempt: int) -> None:
    """One last uninterrupted `--resume_from latest` invocation; it must end the run cleanly."""
    proc = start(out, None, attempt)
    rc = wait(proc, START_TIMEOUT_S)
    assert rc == 0, f"final resume failed (exit {rc}):\n{tail(out, attempt)}"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    assert found, f"no safetensors files in {folder}"
    return found


def assert_same_run(reference: Path, out: Path, note: str) -> None:
    rows_a, rows_b = training_log(reference, timed=False), training_log(out, timed=False)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1)), f"{note}: log steps {[r['step'] for r in rows_b]}"
    for a, b in zip(rows_a, rows_b):
        assert a == b, f"{note}: log row of step {a['step']} differs:\n{a}\n{b}"
    last = f"checkpoints/step-{STEPS:07d}"
    for sub in ("final", last):
        a, b = tensors(reference / sub), tensors(out / sub)
        assert a.keys() == b.keys(), f"{note}: {sub} holds other tensors"
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{note}: {sub}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("kill") / "reference"
    finish(out, 0)
    assert training_log(out, timed=False)[-1]["step"] == STEPS and (out / "final").is_dir()
    return out


@pytest.mark.slow
def test_sigkill_at_named_points(reference: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    points = [
        "tiny-base",  # during the creation of OUT/tiny-base
        "step@3",  # before the first checkpoint: the restart starts from step 0 with tiny-base already present
        f"checkpoint@{SAVE_EVERY * 2}",  # during a checkpoint write
        f"log@{SAVE_EVERY * 3 + 2}",  # a torn last log line
        f"prune@{SAVE_EVERY * 5}",  # a new checkpoint renamed, the old ones not yet pruned
        f"step@{int(rng.integers(SAVE_EVERY * 5 + 1, STEPS))}",  # a random step after that
        "final",  # while final/ is written
    ]
    out = tmp_path / "killed"
    for attempt, point in enumerate(points, start=1):
        proc = start(out, point, attempt)
        rc = wait(proc, START_TIMEOUT_S)
        assert rc == -signal.SIGKILL, (
            f"{FAULT_ENV}={point}: the run was not killed (exit {rc}): the point was never reached:\n"
            f"{tail(out, attempt)}"
        )
    finish(out, len(points) + 1)
    assert_same_run(reference, out, f"killed at {points} (VLM_DEPTH_KILL_SEED={SEED})")


def _log_rows(out: Path) -> int:
    path = out / "log.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


@pytest.mark.slow
def test_sigkill_at_random_moments(reference: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng([SEED, 1])
    steps = sorted(int(s) for s in rng.choice(np.arange(1, STEPS), 5, replace=False))
    triggers: list[tuple[str, int]] = [("tiny-base", 0)] + [("rows", s) for s in steps]
    out = tmp_path / "killed"
    fired = []
    for attempt, (kind, value) in enumerate(triggers, start=1):
        proc = start(out, None, attempt)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if (kind == "tiny-base" and (out / "tiny-base").exists()) or (kind == "rows" and _log_rows(out) >= value):
                break
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0.0, 0.15)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        rc = wait(proc, 60)
        fired.append(f"{kind}:{value}:rc={rc}")
        assert rc in (-signal.SIGKILL, 0), (
            f"attempt {attempt} ({kind} {value}) failed (exit {rc}):\n{tail(out, attempt)}"
        )
    finish(out, len(triggers) + 1)
    assert_same_run(reference, out, f"kills {fired} (VLM_DEPTH_KILL_SEED={SEED})")
