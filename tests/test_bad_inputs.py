"""Bad and unusual inputs, one table row each (issue 16): every row states the one outcome the package must give.

Outcomes:
- `Err(cls, *fragments)`: a `VlmDepthError` whose class (or one of its bases) is named `cls` and whose one-line
  message contains every fragment (case-insensitive). Through the CLI: exit code 2, exactly one `error:` line on
  stderr, no traceback (classes: `vlm_depth.errors`).
- `Warn(fragment)`: a documented fallback: success plus a WARNING log record containing the fragment.
- `Ok()`: success (exit 0, or the API call returns).
Any other exception (a traceback), an argparse `SystemExit`, a network attempt, or a failed output check fails the
row. Rows may add a `check(world, case_dir, outcome)` on the files left behind (e.g. "the old run is untouched").

Everything is tiny (64x48 frames, the offline tiny checkpoint built once, 1-4 training steps) and runs in-process
through `vlm_depth.cli.main`, so the table runs in about 2 minutes on a shared 2-core machine. `docs/bad_inputs.md`
records what the code did for each row before issue 16 was resolved, and where. The error class of a CLI run is
read from `sys.exc_info()` while the CLI writes its `error:` line (inside its `except VlmDepthError` block).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "train" / "tiny-synthetic.yaml")
CASE_TIMEOUT_S = 90  # a row that hangs fails instead of stalling the suite
LOCK_FILE = ".vlm-depth.lock"  # proposed name of the output-folder lock (holds the holder's pid)
SYNTH4 = "synthetic:4?height=48&width=64&seed=0"


# ------------------------------------------------------------------------------------------------ expected outcomes
Check = Callable[["World", Path, "Outcome"], None]


@dataclass
class Want:
    kind: str  # "error" | "warn" | "ok"
    cls: str = ""
    fragments: tuple[str, ...] = ()
    check: Check | None = None


def Err(cls: str, *fragments: str, check: Check | None = None) -> Want:  # noqa: N802
    return Want("error", cls, fragments, check)


def Warn(*fragments: str, check: Check | None = None) -> Want:  # noqa: N802
    return Want("warn", "", fragments, check)


def Ok(check: Check | None = None) -> Want:  # noqa: N802
    return Want("ok", "", (), check)


@dataclass
class Case:
    """One row. `run`: a CLI argv (str.format'ed with w=World, d=case dir) or a function (w, d) -> value (API)."""

    id: str
    run: tuple[str, ...] | Callable[[World, Path], Any]
    want: Want
    setup: Callable[[World, Path], None] | None = None
    hub_online: bool = False  # run with HF_HUB_OFFLINE unset (the socket guard still blocks any connection)
    cwd: bool = False  # run inside the case directory
    mem_cap_gb: float | None = None  # extra address space the row may allocate (rows that once exhausted memory)


# ------------------------------------------------------------------------------------------------------ the world
class World:
    """Shared inputs, built lazily once per session: the tiny checkpoint, a 64x48 RGB-D frame in every encoding, a
    2-frame folder dataset, a finished 2-step full fine-tune run and a LoRA run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / name

    @cached_property
    def tiny(self) -> Path:
        from vlm_depth.model.tiny import build_tiny_checkpoint

        out = self._path("tiny")
        build_tiny_checkpoint(out)
        return out

    @cached_property
    def sample(self):
        from vlm_depth.data.synthetic import generate_sample

        return generate_sample(0, seed=0, height=48, width=64)

    @cached_property
    def rgb(self) -> Path:
        import cv2

        path = self._path("frame_rgb.png")
        cv2.imwrite(str(path), cv2.cvtColor(self.sample.rgb, cv2.COLOR_RGB2BGR))
        return path

    @cached_property
    def jpg(self) -> Path:
        import cv2

        path = self._path("frame.jpg")
        cv2.imwrite(str(path), cv2.cvtColor(self.sample.rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        return path

    @cached_property
    def depth_png(self) -> Path:
        import cv2

        path = self._path("frame_depth_mm.png")
        cv2.imwrite(str(path), np.rint(self.sample.depth * 1000).astype(np.uint16))
        return path

    @cached_property
    def depth_npy(self) -> Path:
        path = self._path("frame_depth_m.npy")
        np.save(path, self.sample.depth.astype(np.float32))
        return path

    @cached_property
    def intrinsics(self) -> Path:
        path = self._path("frame_intrinsics.json")
        path.write_text(json.dumps(dict(zip(("fx", "fy", "cx", "cy"), self.sample.intrinsics))))
        return path

    @cached_property
    def folder(self) -> Path:
        """`folder` dataset: 2 synthetic frames (sensor depth, gt, intrinsics, material)."""
        from vlm_depth.data.folder import write_folder_sample
        from vlm_depth.data.synthetic import generate_sample

        out = self._path("folder")
        for i in range(2):
            sample = generate_sample(i, seed=0, height=48, width=64)
            sample.name = f"f{i}"
            write_folder_sample(out, sample)
        return out

    @cached_property
    def zero_folder(self) -> Path:
        """`folder` dataset whose depth and gt are all 0 (nothing measured anywhere)."""
        from vlm_depth.data.folder import write_folder_sample
        from vlm_depth.data.sample import RGBDSample

        out = self._path("zero_folder")
        for i in range(2):
            zeros = np.zeros((48, 64), np.float32)
            write_folder_sample(out, RGBDSample(rgb=self.sample.rgb, depth=zeros, gt=zeros.copy(), name=f"z{i}"))
        return out

    def train_argv(self, out: Path, *extra: str) -> list[str]:
        return [
            "train", "--config", RECIPE, "--model", str(self.tiny), "--val_dataset", "", "--dataset", SYNTH4,
            "--queries_per_image", "4", "--batch_size", "1", "--num_threads", "1", "--max_steps", "2",
            "--out", str(out), *extra,
        ]  # fmt: skip

    def _train(self, name: str, *extra: str) -> Path:
        from vlm_depth.cli import main

        out = self._path(name)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(self.train_argv(out, *extra)) == 0, f"building {name} failed"
        return out

    @cached_property
    def run(self) -> Path:
        """A finished run (full fine-tune): checkpoints step-1, step-2, final/, log.jsonl (rows 1-2)."""
        return self._train("run", "--save_every", "1", "--keep_checkpoints", "3")

    @cached_property
    def lora(self) -> Path:
        """A finished LoRA run: final/ holds adapter_model.safetensors + base_model.json -> the tiny folder."""
        return self._train("lora", "--finetune", "lora", "--max_steps", "1")

    @cached_property
    def model(self):
        """(DepthVLM, DepthProcessor) of the tiny checkpoint (fresh depth branch), for the API rows."""
        from vlm_depth.model.loading import load_model

        return load_model(str(self.tiny), device="cpu")

    def copy(self, src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst


# --------------------------------------------------------------------------------------------------- running a row
@dataclass
class Outcome:
    kind: str  # "error" (VlmDepthError / CLI error line), "ok", "traceback", "exit" (SystemExit), "timeout", "network"
    rc: int | None = None
    exc: BaseException | None = None
    error_lines: list[str] = field(default_factory=list)
    stderr: str = ""
    stdout: str = ""
    warnings: list[str] = field(default_factory=list)
    value: Any = None
    network: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "error":
            return f"{type(self.exc).__name__ if self.exc else '?'}: {self.message()}"
        if self.kind in ("traceback", "exit", "timeout", "network"):
            text = str(self.exc).strip().splitlines()[0][:200] if str(self.exc).strip() else ""
            return f"{self.kind} {type(self.exc).__name__}: {text}{self.raised_at()}"
        return "ok" + (f" (warnings: {self.warnings[:2]})" if self.warnings else "")

    def raised_at(self) -> str:
        """` (at FILE:LINE in FUNCTION)` of the innermost vlm_depth frame of the exception, if any."""
        import traceback

        frames = traceback.extract_tb(self.exc.__traceback__) if self.exc is not None else []
        ours = [f for f in frames if "/vlm_depth/" in f.filename]
        if not ours:
            return ""
        frame = ours[-1]
        return f" (at {frame.filename.split('/vlm_depth/')[-1]}:{frame.lineno} in {frame.name})"

    def message(self) -> str:
        if self.error_lines:
            return self.error_lines[0][len("error:") :].strip()
        return str(self.exc) if self.exc is not None else ""


class _Stderr(io.StringIO):
    """stderr that remembers the exception being handled when an `error:` line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.handled: BaseException | None = None

    def write(self, text: str) -> int:
        if text.startswith("error:") and self.handled is None:
            self.handled = sys.exc_info()[1]
        return super().write(text)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class NetworkAttempt(BaseException):
    """Raised by the socket guard; a BaseException, so no retry loop (huggingface_hub backs off for ~45 s on
    ordinary connection errors) swallows it."""


@contextlib.contextmanager
def _memory_cap(extra_gb: float | None):
    """Cap this process's address space at its current size + `extra_gb` (MemoryError instead of swapping the
    machine); restored afterwards."""
    if extra_gb is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (current + int(extra_gb * 2**30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def _guards(hub_online: bool, cwd: Path | None):
    """No network (any outside connection attempt is recorded and refused), a per-row alarm, optional chdir,
    HF_HUB_OFFLINE unset for rows that check what happens online."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):  # noqa: ANN001
        host = address[0] if isinstance(address, tuple) else str(address)
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            attempts.append(str(address))
            raise NetworkAttempt(f"network connection attempted: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):  # noqa: ANN001
        if host not in (None, "127.0.0.1", "localhost", "::1"):
            attempts.append(f"dns:{host}")
            raise NetworkAttempt(f"network look-up attempted: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    env_keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    hub_constants = None
    saved_const = None
    if hub_online:
        import huggingface_hub.constants as hub_constants

        saved_const = hub_constants.HF_HUB_OFFLINE
        for k in env_keys:
            os.environ.pop(k, None)
        hub_constants.HF_HUB_OFFLINE = False
    old_cwd = os.getcwd()

    def alarm(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"row ran longer than {CASE_TIMEOUT_S} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    try:
        if cwd is not None:
            os.chdir(cwd)
        yield attempts
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo
        os.chdir(old_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


def execute(case: Case, world: World, case_dir: Path) -> Outcome:
    """Run one row (setup, then the CLI argv or the API function) and classify what happened."""
    from vlm_depth.errors import VlmDepthError

    case_dir.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(world, case_dir)
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    level = root.level
    root.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
    err, out = _Stderr(), io.StringIO()
    outcome = Outcome("ok")
    with _guards(case.hub_online, case_dir if case.cwd else None) as attempts:
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _memory_cap(case.mem_cap_gb):
                if callable(case.run):
                    outcome.value = case.run(world, case_dir)
                    outcome.rc = 0
                else:
                    from vlm_depth.cli import main

                    argv = [a.format(w=world, d=case_dir) for a in case.run]
                    outcome.rc = main(argv)
        except VlmDepthError as exc:
            outcome.kind, outcome.exc = "error", exc
        except TimeoutError as exc:
            outcome.kind, outcome.exc = "timeout", exc
        except NetworkAttempt as exc:
            outcome.kind, outcome.exc = "network", exc
        except SystemExit as exc:
            outcome.kind, outcome.exc, outcome.rc = "exit", exc, exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - a traceback is exactly what the table looks for
            outcome.kind, outcome.exc = "traceback", exc
        finally:
            root.removeHandler(records)
            root.setLevel(level)
    outcome.network = list(attempts)
    outcome.stderr, outcome.stdout = err.getvalue(), out.getvalue()
    outcome.warnings = records.messages
    outcome.error_lines = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    if outcome.kind == "ok" and outcome.rc not in (0, None):
        outcome.kind = "error"
        outcome.exc = err.handled
    return outcome


def _mro_names(exc: BaseException | None) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__} if exc is not None else set()


def judge(case: Case, outcome: Outcome, world: World, case_dir: Path) -> None:
    """Assert that `outcome` is the row's wanted outcome."""
    want = case.want
    assert not outcome.network, f"network attempts: {outcome.network}"
    assert outcome.kind not in ("traceback", "exit", "timeout", "network"), (
        f"wanted {want.kind}, got {outcome.describe()}"
    )
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    if want.kind == "error":
        assert outcome.kind == "error", f"wanted {want.cls} {want.fragments}, got {outcome.describe()}"
        if not callable(case.run):
            assert outcome.rc == 2, f"exit code {outcome.rc}, wanted 2"
            assert len(outcome.error_lines) == 1, f"wanted one error: line, got {outcome.stderr[-1000:]!r}"
        message = outcome.message()
        assert "\n" not in message.strip(), f"multi-line message: {message!r}"
        assert not want.cls or want.cls in _mro_names(outcome.exc), (
            f"wanted {want.cls}, got {type(outcome.exc).__name__ if outcome.exc else 'no exception captured'}: "
            f"{message}"
        )
        for fragment in want.fragments:
            assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    else:
        assert outcome.kind == "ok", f"wanted success, got {outcome.describe()}"
        if want.kind == "warn":
            text = " | ".join(outcome.warnings)
            for fragment in want.fragments:
                assert fragment.lower() in text.lower(), f"no warning with {fragment!r}; warnings: {text!r}"
    if want.check is not None:
        want.check(world, case_dir, outcome)


# ------------------------------------------------------------------------------------------ setups and checks
def write(name: str, content: bytes | str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def chain(*setups: Callable[[World, Path], None]) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        for s in setups:
            s(w, d)

    return setup


def save_npy(name: str, make: Callable[[World], np.ndarray]) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        np.save(d / name, make(w), allow_pickle=True)

    return setup


def save_png(name: str, make: Callable[[World], np.ndarray]) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        import cv2

        assert cv2.imwrite(str(d / name), make(w))

    return setup


def truncate(rel: str, keep: float = 0.5) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        path = d / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return setup


def garble(rel: str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        path = d / rel
        size = max(path.stat().st_size, 64) if path.exists() else 4096
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())

    return setup


def remove(rel: str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        path = d / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def copy_of(attr: str, name: str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        w.copy(getattr(w, attr), d / name)

    return setup


def edit_json(rel: str, **changes: Any) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        path = d / rel
        data = json.loads(path.read_text())
        data.update({k: v.format(w=w, d=d) if isinstance(v, str) else v for k, v in changes.items()})
        path.write_text(json.dumps(data))

    return setup


def sentinel_config(rel: str = "out") -> Callable[[World, Path], None]:
    return write(f"{rel}/config.yaml", "sentinel: keep me\n")


def lock_by(pid_of: Callable[[], int], rel: str = "out") -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        (d / rel).mkdir(parents=True, exist_ok=True)
        (d / rel / LOCK_FILE).write_text(f"{pid_of()}\n")

    return setup


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def cli_ok(argv_builder: Callable[[World, Path], list[str]]) -> Callable[[World, Path], None]:
    """Setup step: a CLI run that must succeed (e.g. a first run into the folder a row then reuses)."""

    def setup(w: World, d: Path) -> None:
        from vlm_depth.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv_builder(w, d)) == 0

    return setup


def log_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "split" not in r]


def checkpoint_names(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def config_untouched(rel: str = "out") -> Check:
    def check(w: World, d: Path, o: Outcome) -> None:
        assert (d / rel / "config.yaml").read_text() == "sentinel: keep me\n", "config.yaml was overwritten"

    return check


def run_untouched(w: World, d: Path, o: Outcome) -> None:
    """The copied 2-step run in d/run is as it was: log rows 1-2, checkpoints step-1/2, final/."""
    assert log_steps(d / "run") == [1, 2]
    assert checkpoint_names(d / "run") == ["step-0000001", "step-0000002"]
    assert (d / "run" / "final").is_dir()


def files_written(*names: str, rel: str = "out") -> Check:
    def check(w: World, d: Path, o: Outcome) -> None:
        for name in names:
            assert (d / rel / name).is_file(), f"{name} not written"

    return check


def no_output(rel: str = "out") -> Check:
    def check(w: World, d: Path, o: Outcome) -> None:
        written = [p.name for p in (d / rel).iterdir()] if (d / rel).is_dir() else []
        assert not [n for n in written if n != LOCK_FILE], f"files written before the error: {written}"

    return check


def complete_argv(*extra: str) -> tuple[str, ...]:
    return ("complete", "--model", "{w.tiny}", "--query_budget", "16", "--out", "{d}/out", *extra)


PAIR = ("--rgb", "{w.rgb}", "--depth", "{w.depth_png}")


def complete_model(model: str) -> tuple[str, ...]:
    return ("complete", "--model", model, "--query_budget", "16", "--out", "{d}/out", "--rgb", "{w.rgb}")


def train_argv(*extra: str, out: str = "{d}/out", model: str = "{w.tiny}") -> tuple[str, ...]:
    return (
        "train", "--config", RECIPE, "--model", model, "--val_dataset", "", "--dataset", SYNTH4,
        "--queries_per_image", "4", "--batch_size", "1", "--num_threads", "1", "--max_steps", "2",
        "--out", out, *extra,
    )  # fmt: skip


def eval_argv(*extra: str) -> tuple[str, ...]:
    return ("eval", "--dataset", "folder:{w.folder}", "--protocol", "uniform:100", "--baseline", "nearest",
            "--panels", "0", "--out", "{d}/out", *extra)  # fmt: skip


def yaml_config(text: str) -> Callable[[World, Path], None]:
    return write("c.yaml", text)


TRAIN_YAML = ("train", "--config", "{d}/c.yaml", "--model", "{w.tiny}", "--val_dataset", "", "--dataset", SYNTH4,
              "--queries_per_image", "4", "--batch_size", "1", "--num_threads", "1", "--out", "{d}/out")  # fmt: skip


# API helpers
def api_complete(rgb: Callable[[World], Any], sparse: Callable[[World], Any] | None = None, **settings: Any):
    def run(w: World, d: Path):
        from vlm_depth import complete
        from vlm_depth.infer.readouts import ReadoutSettings

        model, processor = w.model
        result = complete(
            model,
            processor,
            rgb(w),
            None if sparse is None else sparse(w),
            settings=ReadoutSettings(query_budget=16, **settings),
        )
        return result

    return run


def dense_result(w: World, d: Path, o: Outcome) -> None:
    result = o.value
    assert result.depth.shape == w.sample.rgb.shape[:2]
    assert np.isfinite(result.depth).all() and (result.depth > 0).all()


def keeps_input(flip: bool) -> Check:
    def check(w: World, d: Path, o: Outcome) -> None:
        sparse = w.sample.depth[:, ::-1] if flip else w.sample.depth
        valid = sparse > 0
        np.testing.assert_array_equal(o.value.depth[valid], sparse[valid])

    return check


# ------------------------------------------------------------------------------------------------------- the table
# `now` abbreviations: CLEAR = one `error:` line today; TB = traceback today; SILENT = exit 0 with wrong output.
# fmt: off
CASES: list[Case] = [
    # ---------------------------------------------------------------- CLI basics and configs (all commands)
    Case("cli-unknown-command", ("frobnicate",), Err("", "unknown command")),
    Case("cfg-unknown-flag", ("synth", "--out", "{d}/out", "--nmu", "3"), Err("ConfigError", "unknown arguments")),
    Case("cfg-bad-int-flag", train_argv("--max_steps", "abc"), Err("ConfigError", "max_steps", "abc")),
    Case("cfg-flag-without-value", ("synth", "--out", "{d}/out", "--num"), Err("ConfigError", "--num")),
    Case("cfg-bad-choice-flag", train_argv("--finetune", "bogus"), Err("ConfigError", "finetune", "bogus")),
    Case("cfg-missing-file", ("synth", "--config", "{d}/nope.yaml", "--out", "{d}/out"),
         Err("ConfigError", "not found")),
    Case("cfg-yaml-list", ("synth", "--config", "{d}/c.yaml", "--out", "{d}/out"), Err("ConfigError", "mapping"),
         setup=yaml_config("- 1\n- 2\n")),
    Case("cfg-yaml-unknown-key", ("synth", "--config", "{d}/c.yaml", "--out", "{d}/out"),
         Err("ConfigError", "unknown keys"), setup=yaml_config("nmu: 3\n")),
    Case("cfg-yaml-broken", TRAIN_YAML, Err("ConfigError", "c.yaml", "yaml"),
         setup=yaml_config("max_steps: [2\nseed: 0\n")),
    Case("cfg-yaml-python-tag", TRAIN_YAML, Err("ConfigError", "c.yaml"),
         setup=yaml_config("max_steps: !!python/object/apply:os.getcwd []\n")),
    Case("cfg-yaml-float-for-int", TRAIN_YAML, Err("ConfigError", "max_steps", "2.7"),
         setup=yaml_config("max_steps: 2.7\n")),
    Case("cfg-yaml-null-for-int", TRAIN_YAML, Err("ConfigError", "max_steps"),
         setup=yaml_config("max_steps: null\n")),
    Case("cfg-yaml-string-for-int", TRAIN_YAML, Err("ConfigError", "max_steps", "ten"),
         setup=yaml_config("max_steps: ten\n")),
    Case("cfg-yaml-bad-literal", TRAIN_YAML, Err("ConfigError", "finetune", "bogus"),
         setup=yaml_config("max_steps: 1\nfinetune: bogus\n")),
    Case("cfg-yaml-exponent-string", TRAIN_YAML,
         Ok(check=lambda w, d, o: __import__("yaml").safe_load((d / "out" / "config.yaml").read_text())["lr_branch"]
            == 1e-3 or pytest.fail("lr_branch not converted to 0.001")),
         setup=yaml_config("max_steps: 1\nlr_branch: 1e-3\n")),
    Case("cfg-yaml-bool-string", TRAIN_YAML,
         Ok(check=lambda w, d, o: __import__("yaml").safe_load((d / "out" / "config.yaml").read_text())
            ["cache_images"] is False or pytest.fail("cache_images 'no' not converted to false")),
         setup=yaml_config("max_steps: 1\ncache_images: 'no'\n")),
    Case("cfg-config-twice", ("synth", "--config", "{d}/c.yaml", "--config", "{d}/c2.yaml", "--out", "{d}/out"),
         Err("ConfigError", "--config"), setup=chain(yaml_config("num: 1\n"), write("c2.yaml", "num: 2\n"))),
    Case("cfg-no-prefix-matching", train_argv("--max_step", "5"), Err("ConfigError", "--max_step", check=no_output())),
    Case("cfg-renamed-option", complete_argv(*PAIR, "--num_queries", "16"), Err("ConfigError", "query_budget")),
    # ---------------------------------------------------------------- output folders (every command)
    Case("out-is-a-file", ("synth", "--num", "1", "--height", "32", "--width", "32", "--out", "{d}/f"),
         Err("RunFolderError", "--out", "not a folder"), setup=write("f", "x")),
    Case("out-in-proc", ("tiny", "--out", "/proc/vlm-depth-test"), Err("RunFolderError", "--out", "/proc")),
    Case("out-empty", ("complete", "--model", "{w.tiny}", "--query_budget", "16", "--out", "", *PAIR),
         Err("ConfigError", "--out"),
         cwd=True),
    Case("out-locked-by-live-process", complete_argv(*PAIR), Err("RunFolderError", "in use", "pid"),
         setup=lock_by(os.getppid)),
    Case("out-stale-lock", complete_argv(*PAIR), Warn("stale", check=files_written("summary.json")),
         setup=lock_by(dead_pid)),
    # ---------------------------------------------------------------- tiny
    Case("tiny-hidden-not-multiple", ("tiny", "--out", "{d}/out", "--hidden_size", "100"),
         Err("ConfigError", "hidden_size")),
    Case("tiny-zero-layers", ("tiny", "--out", "{d}/out", "--num_layers", "0"), Err("ConfigError", "num_layers")),
    Case("tiny-pixels-inverted", ("tiny", "--out", "{d}/out", "--min_pixels", "100000", "--max_pixels", "1000"),
         Err("ConfigError", "min_pixels")),
    # ---------------------------------------------------------------- synth
    Case("synth-num-zero", ("synth", "--out", "{d}/out", "--num", "0"), Err("ConfigError", "--num")),
    Case("synth-too-small", ("synth", "--out", "{d}/out", "--height", "10"), Err("ConfigError", "32")),
    Case("synth-bad-scene", ("synth", "--out", "{d}/out", "--scene", "moon"), Err("ConfigError", "scene")),
    Case("synth-huge-width", ("synth", "--out", "{d}/out", "--num", "1", "--workers", "1", "--height", "32",
                              "--width", "100000"),
         Err("ConfigError", "--width", "100000", check=no_output()), mem_cap_gb=1.5),
    Case("synth-negative-workers", ("synth", "--out", "{d}/out", "--num", "1", "--height", "32", "--width", "32",
                                    "--workers", "-1"),
         Err("ConfigError", "workers")),
    Case("synth-negative-seed", ("synth", "--out", "{d}/out", "--num", "1", "--height", "32", "--width", "32",
                                 "--seed", "-1"),
         Err("ConfigError", "seed")),
    Case("synth-rerun-fewer-frames", ("synth", "--out", "{d}/out", "--num", "1", "--height", "32", "--width", "32"),
         Err("RunFolderError", "--overwrite"),
         setup=cli_ok(lambda w, d: ["synth", "--out", f"{d}/out", "--num", "2", "--height", "32", "--width", "32",
                                    "--workers", "1"])),
    # ---------------------------------------------------------------- complete: options
    Case("cmp-ok-baseline", complete_argv(*PAIR), Ok(check=files_written("summary.json", "frame_rgb_depth.png"))),
    Case("cmp-no-input", complete_argv(), Err("ConfigError", "--rgb", "--dataset")),
    Case("cmp-rgb-and-dataset", complete_argv(*PAIR, "--dataset", "folder:{w.folder}"),
         Err("ConfigError", "--rgb", "--dataset")),
    Case("cmp-no-model", ("complete", "--rgb", "{w.rgb}", "--out", "{d}/out"), Err("ConfigError", "--model")),
    Case("cmp-depth-scale-inf", complete_argv(*PAIR, "--depth_scale", "inf"), Err("ConfigError", "depth_scale")),
    Case("cmp-depth-scale-nan", complete_argv(*PAIR, "--depth_scale", "nan"), Err("ConfigError", "scale")),
    Case("cmp-depth-scale-zero", complete_argv(*PAIR, "--depth_scale", "0"), Err("ConfigError", "scale")),
    Case("cmp-depth-scale-one-mm-png", complete_argv(*PAIR, "--depth_scale", "1"),
         Err("ImplausibleDepthError", "--depth_scale", check=no_output())),
    Case("cmp-limit-negative", complete_argv("--dataset", "folder:{w.folder}", "--limit", "-1"),
         Err("ConfigError", "--limit")),
    Case("cmp-intrinsics-with-dataset", complete_argv("--dataset", "folder:{w.folder}", "--intrinsics", "50,50,32,24"),
         Err("ConfigError", "--intrinsics", "--rgb")),
    Case("cmp-depth-with-dataset", complete_argv("--dataset", "folder:{w.folder}", "--depth", "{w.depth_png}"),
         Err("ConfigError", "--depth", "--rgb")),
    Case("cmp-fov-negative", complete_argv(*PAIR, "--fov", "-30"), Err("ConfigError", "fov")),
    Case("cmp-fov-too-wide", complete_argv(*PAIR, "--fov", "200"), Err("ConfigError", "fov")),
    Case("cmp-color-range-bad", complete_argv(*PAIR, "--color_range", "5,1"), Err("ConfigError", "color_range")),
    Case("cmp-colormap-bad", complete_argv(*PAIR, "--colormap", "nope"),
         Err("ConfigError", "colormap", check=config_untouched()), setup=sentinel_config()),
    Case("cmp-readout-bad", complete_argv(*PAIR, "--readout", "nope"),
         Err("ConfigError", "readout", check=config_untouched()), setup=sentinel_config()),
    Case("cmp-readout-bad-new-folder", complete_argv(*PAIR, "--readout", "bogus"),
         Err("ConfigError", "readout", check=no_output())),
    Case("cmp-readout-mdm-no-head", complete_argv(*PAIR, "--readout", "mdm"), Err("ModelError", "mdm")),
    Case("cmp-query-budget-zero", complete_argv(*PAIR, "--query_budget", "0"), Err("ConfigError", "query_budget")),
    Case("cmp-stride-negative", complete_argv(*PAIR, "--stride", "-4"), Err("ConfigError", "stride")),
    Case("cmp-queries-per-pass-zero", complete_argv(*PAIR, "--max_queries_per_pass", "0"),
         Err("ConfigError", "max_queries_per_pass")),
    Case("cmp-refine-negative", complete_argv(*PAIR, "--refine_queries", "-5"), Err("ConfigError", "refine_queries")),
    Case("cmp-refine-by-bad", complete_argv(*PAIR, "--refine_queries", "4", "--refine_by", "vibes"),
         Err("ConfigError", "refine_by")),
    Case("cmp-packing-bad", complete_argv(*PAIR, "--packing", "zip"), Err("ConfigError", "packing")),
    Case("cmp-device-cuda-no-gpu", complete_argv(*PAIR, "--device", "cuda"), Err("DeviceError", "cuda", "--device")),
    Case("cmp-device-bogus", complete_argv(*PAIR, "--device", "gpu7"), Err("ConfigError", "device")),
    Case("cmp-max-input-pixels", complete_argv(*PAIR, "--max_input_pixels", "1000"),
         Err("InputTooLargeError", "--max_input_pixels", check=no_output())),
    Case("cmp-rerun-into-used-folder", complete_argv(*PAIR), Err("RunFolderError", "--overwrite"),
         setup=cli_ok(lambda w, d: ["complete", "--model", str(w.tiny), "--query_budget", "16", "--out",
                                    f"{d}/out", "--dataset", f"folder:{w.folder}"])),
    Case("cmp-overwrite", complete_argv(*PAIR, "--overwrite", "true"),
         Ok(check=lambda w, d, o: not [p.name for p in (d / "out").glob("f[01]_*")]
            or pytest.fail("old frames left")),
         setup=cli_ok(lambda w, d: ["complete", "--model", str(w.tiny), "--query_budget", "16", "--out",
                                    f"{d}/out", "--dataset", f"folder:{w.folder}"])),
    # ---------------------------------------------------------------- complete: image files
    Case("img-rgb-missing", complete_argv("--rgb", "{d}/nope.png"), Err("DataError", "not found")),
    Case("img-rgb-is-folder", complete_argv("--rgb", "{d}"), Err("DataError", "not found")),
    Case("img-rgb-garbage", complete_argv("--rgb", "{d}/x.png"), Err("DataError", "cannot decode"),
         setup=write("x.png", b"not an image at all")),
    Case("img-rgb-empty-file", complete_argv("--rgb", "{d}/x.png"), Err("DataError", "x.png"),
         setup=write("x.png", b"")),
    Case("img-rgb-truncated-jpeg", complete_argv("--rgb", "{d}/x.jpg"), Err("DataError", "truncated"),
         setup=lambda w, d: (d / "x.jpg").write_bytes(w.jpg.read_bytes()[: len(w.jpg.read_bytes()) // 2])),
    Case("img-rgb-truncated-png", complete_argv("--rgb", "{d}/x.png"), Err("DataError", "x.png"),
         setup=lambda w, d: (d / "x.png").write_bytes(w.rgb.read_bytes()[: len(w.rgb.read_bytes()) // 2])),
    Case("img-rgb-16bit", complete_argv("--rgb", "{w.depth_png}"), Err("DataError", "8-bit")),
    Case("img-rgb-2x1000", complete_argv("--rgb", "{d}/x.png"), Err("DataError", "aspect"),
         setup=save_png("x.png", lambda w: np.full((2, 1000, 3), 128, np.uint8))),
    Case("img-rgb-0x0-api", api_complete(lambda w: np.zeros((0, 0, 3), np.uint8)), Err("DataError", "empty")),
    Case("img-rgb-1x1", complete_argv("--rgb", "{d}/x.png"), Err("DataError", "x.png", "too small"),
         setup=save_png("x.png", lambda w: np.full((1, 1, 3), 128, np.uint8))),
    # ---------------------------------------------------------------- complete: depth files and values
    Case("dep-missing", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/nope.png"), Err("DataError", "not found")),
    Case("dep-8bit-png", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.png"), Err("DataError", "8-bit"),
         setup=save_png("x.png", lambda w: np.full((48, 64), 7, np.uint8))),
    Case("dep-colour-png", complete_argv("--rgb", "{w.rgb}", "--depth", "{w.rgb}"), Err("DataError", "channels")),
    Case("dep-unknown-suffix", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.txt"),
         Err("DataError", "unknown depth file type"), setup=write("x.txt", "1 2 3")),
    Case("dep-npy-empty-file", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "x.npy"),
         setup=write("x.npy", b"")),
    Case("dep-npy-truncated", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "x.npy"),
         setup=lambda w, d: (d / "x.npy").write_bytes(w.depth_npy.read_bytes()[:1000])),
    Case("dep-npy-0x0", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "empty"),
         setup=save_npy("x.npy", lambda w: np.zeros((0, 0), np.float32))),
    Case("dep-npy-pickle", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "numeric"),
         setup=save_npy("x.npy", lambda w: np.array([{"a": 1}], dtype=object))),
    Case("dep-npy-3d", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "shape"),
         setup=save_npy("x.npy", lambda w: np.zeros((48, 64, 3), np.float32))),
    Case("dep-npy-bool", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "dtype"),
         setup=save_npy("x.npy", lambda w: w.sample.depth > 0)),
    Case("dep-npy-1e30", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Err("ImplausibleDepthError", "--depth_scale", check=no_output()),
         setup=save_npy("x.npy", lambda w: np.where(w.sample.depth > 0, np.float32(1e30), 0).astype(np.float32))),
    Case("dep-npy-mm-floats", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Err("ImplausibleDepthError", "--depth_scale"),
         setup=save_npy("x.npy", lambda w: (w.sample.depth * 1000).astype(np.float32))),
    Case("dep-all-below-1mm", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Err("ImplausibleDepthError", "1 cm", "--depth_scale"),
         setup=save_npy("x.npy", lambda w: (w.sample.depth / 1e4).astype(np.float32))),
    Case("dep-png-m-with-mm-scale", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.png"),
         Err("ImplausibleDepthError", "1 cm", "--depth_scale"),
         setup=save_png("x.png", lambda w: np.rint(w.sample.depth).astype(np.uint16))),
    Case("dep-all-nan", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "NaN"),
         setup=save_npy("x.npy", lambda w: np.full((48, 64), np.nan, np.float32))),
    Case("dep-all-negative", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Err("DataError", "negative", check=no_output()),
         setup=save_npy("x.npy", lambda w: -np.abs(w.sample.depth) - 1)),
    Case("dep-all-zero", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Warn("monocular", check=files_written("frame_rgb_depth.png")),
         setup=save_npy("x.npy", lambda w: np.zeros((48, 64), np.float32))),
    Case("dep-other-aspect", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"), Err("DataError", "aspect"),
         setup=save_npy("x.npy", lambda w: np.ones((48, 48), np.float32))),
    Case("dep-half-resolution", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.npy"),
         Ok(check=files_written("frame_rgb_depth.png")),
         setup=save_npy("x.npy", lambda w: w.sample.depth[::2, ::2].copy())),
    Case("dep-h5-two-datasets", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.h5"), Err("DataError", "key"),
         setup=lambda w, d: _h5(d / "x.h5", a=w.sample.depth, b=w.sample.depth)),
    Case("dep-h5-not-hdf5", complete_argv("--rgb", "{w.rgb}", "--depth", "{d}/x.h5"), Err("DataError", "x.h5"),
         setup=write("x.h5", b"not hdf5")),
    Case("dep-folder-orphan-depth", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(f"folder:{d}"),
         Err("DataError", "without a matching"), setup=save_npy("a_depth.npy", lambda w: w.sample.depth)),
    Case("dep-folder-bad-meta", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(f"folder:{d}/f")[0],
         Err("DataError", "meta.json"), setup=chain(copy_of("folder", "f"), write("f/f0_meta.json", "{"))),
    Case("dep-folder-bad-intrinsics", complete_argv("--dataset", "folder:{d}/f"), Err("DataError", "f0_intrinsics"),
         setup=chain(copy_of("folder", "f"), write("f/f0_intrinsics.json", "[1, 2, 3, 4]"))),
    # ---------------------------------------------------------------- complete: intrinsics
    Case("intr-json-number", complete_argv(*PAIR, "--intrinsics", "{d}/k.json"), Err("DataError", "k.json"),
         setup=write("k.json", "5")),
    Case("intr-json-string", complete_argv(*PAIR, "--intrinsics", "{d}/k.json"), Err("DataError", "k.json"),
         setup=write("k.json", '"fx fy cx cy"')),
    Case("intr-json-not-json", complete_argv(*PAIR, "--intrinsics", "{d}/k.json"), Err("DataError", "k.json"),
         setup=write("k.json", "{fx: 1")),
    Case("intr-json-non-numeric", complete_argv(*PAIR, "--intrinsics", "{d}/k.json"), Err("DataError", "k.json"),
         setup=write("k.json", '{"fx": "a", "fy": 1, "cx": 1, "cy": 1}')),
    Case("intr-json-missing-key", complete_argv(*PAIR, "--intrinsics", "{d}/k.json"), Err("DataError", "lacks"),
         setup=write("k.json", '{"fx": 50, "fy": 50}')),
    Case("intr-three-numbers", complete_argv(*PAIR, "--intrinsics", "1,2,3"), Err("ConfigError", "intrinsics")),
    Case("intr-negative-focal", complete_argv(*PAIR, "--intrinsics=-50,50,32,24"), Err("DataError", "fx")),
    Case("intr-leading-minus-value", complete_argv(*PAIR, "--intrinsics", "-50,50,32,24"),
         Err("ConfigError", "--intrinsics")),
    Case("intr-txt-five-numbers", complete_argv(*PAIR, "--intrinsics", "{d}/k.txt"), Err("DataError", "5 numbers"),
         setup=write("k.txt", "1 2 3 4 5\n")),
    Case("intr-ok-writes-ply", complete_argv(*PAIR, "--intrinsics", "{w.intrinsics}"),
         Ok(check=files_written("frame_rgb.ply"))),
    # ---------------------------------------------------------------- model folders
    Case("mdl-truncated-weights", complete_model("{d}/m"), Err("ModelError", "model.safetensors"),
         setup=chain(copy_of("tiny", "m"), truncate("m/model.safetensors"))),
    Case("mdl-missing-weights", complete_model("{d}/m"), Err("ModelError", "model.safetensors"),
         setup=chain(copy_of("tiny", "m"), remove("m/model.safetensors"))),
    Case("mdl-missing-config", complete_model("{d}/m"), Err("ModelError", "config.json"),
         setup=chain(copy_of("tiny", "m"), remove("m/config.json")), mem_cap_gb=1.5),
    Case("mdl-empty-config", complete_model("{d}/m"), Err("ModelError", "config.json"),
         setup=chain(copy_of("tiny", "m"), write("m/config.json", b""))),
    Case("mdl-missing-tokenizer", complete_model("{d}/m"), Err("ModelError", "tokenizer"),
         setup=chain(copy_of("tiny", "m"), remove("m/tokenizer.json"))),
    Case("mdl-garbage-branch", complete_model("{d}/m"),
         Err("ModelError", "depth_branch.safetensors"),
         setup=chain(copy_of("run", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     garble("m/depth_branch.safetensors"))),
    Case("mdl-branch-config-not-json", complete_model("{d}/m"),
         Err("ModelError", "vlm_depth_config.json"),
         setup=chain(copy_of("run", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     write("m/vlm_depth_config.json", "{not json"))),
    Case("mdl-branch-config-unknown-key", complete_model("{d}/m"),
         Err("ModelError", "vlm_depth_config.json", "unknown keys"),
         setup=chain(copy_of("run", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     edit_json("m/vlm_depth_config.json", bogus=1))),
    Case("mdl-branch-config-bad-value", complete_model("{d}/m"),
         Err("ModelError", "vlm_depth_config.json", "decimals"),
         setup=chain(copy_of("run", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     edit_json("m/vlm_depth_config.json", decimals="three"))),
    Case("mdl-is-training-checkpoint", complete_model("{w.run}/checkpoints/step-0000002"),
         Err("ModelError", "final")),
    Case("mdl-is-run-folder", complete_model("{w.run}"), Err("ModelError", "final")),
    Case("mdl-is-a-file", complete_model("{w.rgb}"), Err("ModelError", "not found")),
    Case("mdl-final-ok", complete_model("{w.run}/final"), Ok(check=files_written("summary.json"))),
    # ---------------------------------------------------------------- network: local paths never go to the Hub
    Case("net-bare-name", complete_model("nope"), Err("ModelError", "nope", "not found"),
         hub_online=True, cwd=True),
    Case("net-relative-two-parts", complete_model("runs/nope"),
         Err("ModelError", "runs/nope", "not found"), setup=lambda w, d: (d / "runs").mkdir(),
         hub_online=True, cwd=True),
    Case("net-offline-hub-id", complete_model("someone/some-model"),
         Err("ModelError", "HF_HUB_OFFLINE"), cwd=True),
    Case("net-base-model-local-not-passed", complete_model("{d}/m"),
         Err("ModelError", "base_model.json", "--base_model"),
         setup=chain(copy_of("lora", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     copy_of("tiny", "elsewhere"), edit_json("m/base_model.json", base_model="{d}/elsewhere"))),
    Case("net-base-model-hub-offline", complete_model("{d}/m"),
         Err("ModelError", "base_model.json", "HF_HUB_OFFLINE"),
         setup=chain(copy_of("lora", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     edit_json("m/base_model.json", base_model="someone/some-model"))),
    Case("net-base-model-not-json", complete_model("{d}/m"), Err("ModelError", "base_model.json"),
         setup=chain(copy_of("lora", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"),
                     write("m/base_model.json", "{"))),
    Case("net-base-model-passed-cli", (*complete_model("{d}/m"), "--base_model", "{w.tiny}"),
         Ok(check=files_written("summary.json")),
         setup=chain(copy_of("lora", "r"), lambda w, d: shutil.move(d / "r" / "final", d / "m"))),
    Case("net-base-model-own-tiny-base", complete_model("{d}/run/final"), Ok(check=files_written("summary.json")),
         setup=chain(copy_of("tiny", "run/tiny-base"), copy_of("lora", "r"),
                     lambda w, d: shutil.move(d / "r" / "final", d / "run" / "final"),
                     edit_json("run/final/base_model.json", base_model="/moved/elsewhere/tiny-base"))),
    Case("net-base-model-passed-api",
         lambda w, d: __import__("vlm_depth.model.depth_vlm", fromlist=["DepthVLM"]).DepthVLM.from_pretrained(
             w.lora / "final", base_model=str(w.tiny)),
         Ok()),
    # ---------------------------------------------------------------- Python API
    Case("api-flipped-arrays", api_complete(lambda w: w.sample.rgb[:, ::-1], lambda w: w.sample.depth[:, ::-1]),
         Ok(check=keeps_input(flip=True))),
    Case("api-float64-depth", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth.astype(np.float64)),
         Ok(check=keeps_input(flip=False))),
    Case("api-depth-list", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth.tolist()),
         Ok(check=keeps_input(flip=False))),
    Case("api-mm-floats", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth * 1000),
         Err("ImplausibleDepthError", "meters")),
    Case("api-uint16-depth", api_complete(lambda w: w.sample.rgb, lambda w: (w.sample.depth * 1000).astype(np.uint16)),
         Err("DataError", "read_depth")),
    Case("api-rgb-float", api_complete(lambda w: w.sample.rgb.astype(np.float32), lambda w: w.sample.depth),
         Err("DataError", "uint8")),
    Case("api-rgb-gray-monocular", api_complete(lambda w: w.sample.rgb[..., 0]), Err("DataError", "uint8")),
    Case("api-rgba", api_complete(lambda w: np.dstack([w.sample.rgb, np.full((48, 64), 255, np.uint8)]),
                                  lambda w: w.sample.depth),
         Err("DataError", "(H, W, 3)")),
    Case("api-depth-hw1", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth[..., None]),
         Err("DataError", "(H, W)")),
    Case("api-all-negative", api_complete(lambda w: w.sample.rgb, lambda w: -np.ones((48, 64), np.float32)),
         Err("DataError", "negative")),
    Case("api-readout-bad", lambda w, d: __import__("vlm_depth").complete(*w.model, w.sample.rgb, None, "nope"),
         Err("ConfigError", "readout")),
    Case("api-settings-zero-queries", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth,
                                                  max_queries_per_pass=0),
         Err("ConfigError", "max_queries_per_pass")),
    Case("api-max-input-pixels", api_complete(lambda w: w.sample.rgb, lambda w: w.sample.depth,
                                              max_input_pixels=1000),
         Err("InputTooLargeError", "max_input_pixels")),
    Case("api-48-megapixels-default-budget", api_complete(lambda w: np.zeros((6000, 8000, 3), np.uint8)),
         Err("InputTooLargeError", "max_input_pixels")),
    Case("api-load-depth-scale-str", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(
             f"folder:{w.folder}", depth_scale="abc"),
         Err("ConfigError", "depth_scale")),
    Case("api-load-depth-scale-inf", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(
             f"folder:{w.folder}", depth_scale=float("inf"))[0],
         Err("ConfigError", "depth_scale")),
    Case("api-load-unknown-option", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(
             f"folder:{w.folder}", scale=256),
         Err("ConfigError", "scale")),
    Case("api-load-bad-spec", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load("nokind:/x"),
         Err("ConfigError", "KIND:PATH")),
    Case("api-load-missing-root", lambda w, d: __import__("vlm_depth.data", fromlist=["load"]).load(
             f"folder:{d}/nope"), Err("DataError", "not found")),
    # ---------------------------------------------------------------- eval
    Case("eval-ok", eval_argv(), Ok(check=files_written("results.csv", "report.md"))),
    Case("eval-max-depth-negative", eval_argv("--max_depth", "-1"), Err("ConfigError", "max_depth")),
    Case("eval-max-images-negative", eval_argv("--max_images", "-1"), Err("ConfigError", "max_images")),
    Case("eval-panels-negative", eval_argv("--panels", "-1"), Err("ConfigError", "panels")),
    Case("eval-options-bad-yaml", eval_argv("--options", "{{depth_scale: [1"), Err("ConfigError", "--options")),
    Case("eval-options-not-mapping", eval_argv("--options", "5"), Err("ConfigError", "--options")),
    Case("eval-options-bad-scale", eval_argv("--options", "{{depth_scale: abc}}"), Err("ConfigError", "depth_scale")),
    Case("eval-options-unknown", eval_argv("--options", "{{scale: 256}}"), Err("ConfigError", "scale")),
    Case("eval-bad-protocol", eval_argv("--protocol", "uniform:-5"), Err("ConfigError", "uniform")),
    Case("eval-bad-baseline", eval_argv("--baseline", "magic"), Err("ConfigError", "magic")),
    Case("eval-model-and-baseline", eval_argv("--model", "{w.tiny}"), Err("ConfigError", "exactly one")),
    Case("eval-missing-model", ("eval", "--dataset", "folder:{w.folder}", "--model", "{d}/nope", "--out", "{d}/out"),
         Err("ModelError", "not found")),
    Case("eval-bad-crop", eval_argv("--crop", "a:b"), Err("ConfigError", "crop")),
    Case("eval-missing-suite", ("eval", "--suite", "{d}/nope.yaml", "--out", "{d}/out"), Err("ConfigError", "nope")),
    Case("eval-missing-dataset", ("eval", "--dataset", "folder:{d}/nope", "--baseline", "nearest", "--protocol",
                                  "uniform:100", "--out", "{d}/out"),
         Err("DataError", "not found")),
    Case("eval-rerun-into-used-folder", eval_argv(), Err("RunFolderError", "--overwrite"),
         setup=cli_ok(lambda w, d: [a.format(w=w, d=d) for a in eval_argv("--protocol", "uniform:50,uniform:100")])),
    Case("eval-overwrite", eval_argv("--overwrite", "true"),
         Ok(check=lambda w, d, o: not list((d / "out").rglob("uniform_50")) or pytest.fail("old cell left")),
         setup=cli_ok(lambda w, d: [a.format(w=w, d=d) for a in eval_argv("--protocol", "uniform:50,uniform:100")])),
    # ---------------------------------------------------------------- demo
    Case("demo-zero-steps", ("demo", "--out", "{d}/out", "--train_steps", "0"), Err("ConfigError", "train_steps")),
    Case("demo-foreign-folder", ("demo", "--out", "{d}/out"), Err("ConfigError", "--out"),
         setup=write("out/notes.txt", "mine")),
    # ---------------------------------------------------------------- bench
    Case("bench-unknown", ("bench", "nope"), Err("ConfigError", "decoder")),
    Case("bench-no-model", ("bench", "decoder"), Err("ConfigError", "--model")),
    # ---------------------------------------------------------------- train: options
    Case("trn-save-every-negative", train_argv("--save_every", "-1"),
         Err("ConfigError", "save_every", check=no_output())),
    Case("trn-keep-zero", train_argv("--keep_checkpoints", "0"), Err("ConfigError", "keep_checkpoints")),
    Case("trn-stop-negative", train_argv("--stop_at_step", "-1"), Err("ConfigError", "stop_at_step")),
    Case("trn-eval-every-negative", train_argv("--eval_every", "-1"), Err("ConfigError", "eval_every")),
    Case("trn-warmup-negative", train_argv("--warmup_steps", "-3"), Err("ConfigError", "warmup_steps")),
    Case("trn-lr-negative", train_argv("--lr_branch", "-1"), Err("ConfigError", "lr_branch")),
    Case("trn-lr-nan", train_argv("--lr_backbone", "nan"), Err("ConfigError", "lr_backbone")),
    Case("trn-num-images-negative", train_argv("--num_images", "-1"), Err("ConfigError", "num_images")),
    Case("trn-epochs-nan", train_argv("--max_steps", "0", "--epochs", "nan"), Err("ConfigError", "epochs")),
    Case("trn-max-pixels-negative", train_argv("--max_pixels", "-5"), Err("ConfigError", "max_pixels")),
    Case("trn-bad-dataset", train_argv("--dataset", "nokind:x"), Err("ConfigError", "KIND:PATH", check=no_output())),
    Case("trn-missing-model", train_argv(model="{d}/nope"), Err("ModelError", "nope")),
    Case("trn-all-zero-depth", train_argv("--dataset", "folder:{w.zero_folder}"),
         Err("DataError", "no valid depth", check=lambda w, d, o: not (d / "out" / "final").exists()
             or pytest.fail("final/ written"))),
    Case("trn-out-is-a-file", train_argv(out="{d}/f"), Err("RunFolderError", "not a folder"), setup=write("f", "x")),
    Case("trn-locked", train_argv(), Err("RunFolderError", "in use", "pid"), setup=lock_by(os.getppid)),
    Case("trn-overwrite-and-resume", train_argv("--overwrite", "true", "--resume_from", "latest"),
         Err("ConfigError", "--overwrite", "--resume_from", check=no_output())),
    # ---------------------------------------------------------------- train: run folders, checkpoints, resume
    Case("run-fresh-into-existing-run", train_argv(out="{d}/run"),
         Err("RunFolderError", "--resume_from latest", "--overwrite", check=run_untouched),
         setup=copy_of("run", "run")),
    Case("run-fresh-after-longer-run-then-resume", train_argv("--resume_from", "latest", "--max_steps", "1",
                                                              out="{d}/run"),
         Err("ConfigError", "max_steps"), setup=copy_of("run", "run")),
    Case("run-overwrite", train_argv("--overwrite", "true", "--save_every", "1", "--max_steps", "1", out="{d}/run"),
         Ok(check=lambda w, d, o: (log_steps(d / "run") == [1] and checkpoint_names(d / "run") == ["step-0000001"])
            or pytest.fail(f"{log_steps(d / 'run')} {checkpoint_names(d / 'run')}")),
         setup=copy_of("run", "run")),
    Case("run-prune-by-recency", train_argv("--resume_from", "{d}/run/checkpoints/step-0000002", "--max_steps", "4",
                                            "--save_every", "1", "--keep_checkpoints", "1", "--stop_at_step", "3",
                                            out="{d}/run"),
         Warn("step-0000004", check=lambda w, d, o: checkpoint_names(d / "run") == ["step-0000003"]
              or pytest.fail(f"checkpoints left: {checkpoint_names(d / 'run')}")),
         setup=cli_ok(lambda w, d: list(w.train_argv(d / "run", "--max_steps", "4", "--save_every", "1",
                                                     "--keep_checkpoints", "3")))),
    Case("run-resume-before-first-checkpoint",
         train_argv("--resume_from", "latest", "--max_steps", "2", out="{d}/run"),
         Warn("no checkpoint", check=lambda w, d, o: log_steps(d / "run") == [1, 2] or pytest.fail("log rows")),
         setup=chain(copy_of("run", "run"), remove("run/checkpoints"), remove("run/final"))),
    Case("run-resume-torn-log", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Warn("log.jsonl", check=lambda w, d, o: log_steps(d / "run") == [1, 2, 3] or pytest.fail("log rows")),
         setup=chain(copy_of("run", "run"), lambda w, d: open(d / "run" / "log.jsonl", "a").write('{"step": 3, "lo'))),
    Case("run-resume-garbage-log-line", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Err("DataError", "log.jsonl", "line 1"),
         setup=chain(copy_of("run", "run"), lambda w, d: (d / "run" / "log.jsonl").write_text(
             "garbage\n" + (w.run / "log.jsonl").read_text()))),
    Case("run-resume-truncated-weights", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Err("CheckpointError", "step-0000002", "step-0000001"),
         setup=chain(copy_of("run", "run"), truncate("run/checkpoints/step-0000002/training_weights.safetensors"))),
    Case("run-resume-missing-state", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Err("CheckpointError", "step-0000002", "step-0000001"),
         setup=chain(copy_of("run", "run"), remove("run/checkpoints/step-0000002/trainer_state.json"))),
    Case("run-resume-garbage-optimizer", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Err("CheckpointError", "step-0000002", "step-0000001"),
         setup=chain(copy_of("run", "run"), garble("run/checkpoints/step-0000002/optimizer.bin"))),
    Case("run-resume-garbage-rng", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Warn("random_states", check=lambda w, d, o: log_steps(d / "run") == [1, 2, 3] or pytest.fail("log rows")),
         setup=chain(copy_of("run", "run"), garble("run/checkpoints/step-0000002/random_states_0.pkl"))),
    Case("run-resume-missing-rng", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Err("ConfigError", "same number of processes"),
         setup=chain(copy_of("run", "run"), remove("run/checkpoints/step-0000002/random_states_0.pkl"))),
    Case("run-resume-not-a-checkpoint", train_argv("--resume_from", "{d}", out="{d}/run"),
         Err("ConfigError", "not a training checkpoint")),
    Case("run-resume-other-finetune", train_argv("--resume_from", "latest", "--finetune", "lora", "--max_steps", "3",
                                                 out="{d}/run"),
         Err("ModelError", "finetune"), setup=copy_of("run", "run")),
    Case("run-resume-tmp-left-over", train_argv("--resume_from", "latest", "--max_steps", "3", out="{d}/run"),
         Ok(check=lambda w, d, o: log_steps(d / "run") == [1, 2, 3] or pytest.fail("log rows")),
         setup=chain(copy_of("run", "run"), lambda w, d: shutil.copytree(
             d / "run/checkpoints/step-0000002", d / "run/checkpoints/.tmp-step-0000003"))),
    Case("run-tiny-base-partial", train_argv("--max_steps", "1", model="tiny"),
         Warn("tiny-base", check=files_written("final/vlm_depth_config.json")),
         setup=write("out/tiny-base/config.json", b"")),
]
# fmt: on


def _h5(path: Path, **arrays: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for key, values in arrays.items():
            f[key] = values


def test_restart_before_first_checkpoint_is_reproducible(world, tmp_path):
    """With OUT/tiny-base already present (a run killed before its first checkpoint), a restart gives the same
    losses as the very first start, which built it (building it must not reseed the training process's RNG)."""
    from vlm_depth.cli import main

    def run(out: Path) -> list[float]:
        argv = train_argv("--max_steps", "2", "--finetune", "lora", "--lora_dropout", "0.1", out=str(out),
                          model="tiny")  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(list(argv)) == 0
        rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "split" not in r]

    first = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "tiny-base", tmp_path / "b" / "tiny-base")
    assert run(tmp_path / "b") == first


IDS = [c.id for c in CASES]
assert len(IDS) == len(set(IDS)), sorted({i for i in IDS if IDS.count(i) > 1})


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("bad-inputs-world"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(case: Case, world: World, tmp_path: Path) -> None:
    outcome = execute(case, world, tmp_path / "case")
    judge(case, outcome, world, tmp_path / "case")
