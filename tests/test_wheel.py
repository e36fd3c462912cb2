"""The wheel is self-contained: built from this tree, installed into a fresh virtual environment and run from an
unrelated directory, it finds every shipped template, recipe, preset and suite by name, builds the same tiny
checkpoint, trains, completes and evaluates, with no source tree on sys.path.

The fresh environment gets its third-party packages as symbolic links to this environment's site-packages (minus
vlm-depth itself, editable-install hooks and the extras' bitsandbytes), and the wheel installed into it with
`pip install --no-deps`: no torch reinstall (minutes), and still a proof, since the package's own files come only
from the wheel, its declared requirements are checked against what the environment holds, and bitsandbytes (an
extra) is really absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm_depth.resources import KINDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Entries of this environment's site-packages left out of the wheel's environment (lowercase name prefixes).
NOT_LINKED = ("vlm_depth", "vlm-depth", "__editable__", "bitsandbytes", "qwen_vl_utils")
BNB_WARNINGS = ("bitsandbytes", "gemm_4bit")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shipped_sources() -> dict[str, dict[str, str]]:
    return {kind: {p.stem: _sha(p) for p in sorted((REPO / kind).glob("*.yaml"))} for kind in KINDS}


def _build_wheel(root: Path) -> Path:
    """`pip wheel` of a copy of the tree (an in-tree build would leave build/ and *.egg-info behind)."""
    src = root / "src"
    skip = shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPO, src, ignore=skip)
    try:  # the environment's own setuptools when it fits (no download), else pip's isolated build environment
        isolation = [] if int(version("setuptools").split(".")[0]) < 68 else ["--no-build-isolation"]
    except Exception:
        isolation = []
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(root / "dist"), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (root / "dist").glob("vlm_depth-*.whl")
    return wheel


def _fresh_venv(root: Path) -> tuple[Path, Path]:
    """A venv whose site-packages links this environment's packages, except those of NOT_LINKED."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = Path(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip())
    paths = sysconfig.get_paths()
    for source in map(Path, dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()])):
        for entry in sorted(source.iterdir()) if source.is_dir() else []:
            name = entry.name.lower()
            if name.startswith(NOT_LINKED) or name == "__pycache__" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return python, target


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    python, site_packages = _fresh_venv(root)
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)
    elsewhere = root / "elsewhere"  # an unrelated working directory: no source tree, no prompts/ or train/
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1")

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        out = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{args} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    return SimpleNamespace(wheel=wheel, python=python, site=site_packages, cwd=elsewhere, run=run)


def test_wheel_holds_every_module_and_shipped_file(wheel_env):
    names = set(zipfile.ZipFile(wheel_env.wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "vlm_depth").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel: add their packages to pyproject.toml"
    shipped = {
        f"vlm_depth/resources/{kind}/{name}.yaml" for kind, files in _shipped_sources().items() for name in files
    }
    assert shipped <= names
    assert {n for n in names if n.startswith("vlm_depth/resources/") and not n.endswith(".py")} == shipped


CHECK_INSTALLED = r"""
import peft, vlm_depth.train.trainer, vlm_depth.model.finetune  # on CPU without bitsandbytes: no warning printed
import hashlib, importlib.metadata as md, importlib.util, json, sys
from accelerate.commands.config.config_args import ClusterConfig
from packaging.requirements import Requirement
import vlm_depth
from vlm_depth.cli import COMMANDS, _resolve
from vlm_depth.config import parse_config
from vlm_depth.errors import VlmDepthError
from vlm_depth.eval.suite import load_suite
from vlm_depth.prompts.template import PromptTemplate
from vlm_depth.resources import resource_files, resource_path

kinds = json.loads(sys.argv[1])
found = {}
for kind, names in kinds.items():
    found[kind] = {}
    for name in names:
        path = resource_path(kind, name)
        assert resource_path(kind, f"{kind}/{name}.yaml") == path
        found[kind][name] = [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
        if kind == "prompts":
            PromptTemplate.load(name)
        elif kind == "eval":
            load_suite(name)
        elif kind == "launch":
            ClusterConfig.from_yaml_file(path)  # accelerate's own reader of `accelerate launch --config_file`
        else:
            command = COMMANDS["train" if kind == "train" else "complete"]
            parse_config(_resolve(command.config), ["--config", name])
listed = {kind: [p.stem for p in resource_files(kind)] for kind in kinds}
unmet = []
for line in md.requires("vlm-depth"):
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        have = md.version(req.name)
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} (installed {have})")
try:
    from vlm_depth.model.checkpoint import _nf4_kwargs
    _nf4_kwargs("nf4", {})
    qlora_error = ""
except VlmDepthError as err:
    qlora_error = str(err)
print(json.dumps({
    "package": vlm_depth.__file__, "version": vlm_depth.__version__, "found": found, "listed": listed,
    "unmet": unmet, "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None, "qlora_error": qlora_error,
}))
"""


def test_installed_wheel_finds_shipped_files_by_name_without_extras(wheel_env):
    sources = _shipped_sources()
    names = json.dumps({kind: list(files) for kind, files in sources.items()})
    out = wheel_env.run(str(wheel_env.python), "-c", CHECK_INSTALLED, names)
    *printed, result = out.stdout.strip().splitlines()
    assert not any(w in "\n".join([*printed, out.stderr]) for w in BNB_WARNINGS), out.stderr[-2000:]
    got = json.loads(result)
    assert Path(got["package"]).resolve().is_relative_to(wheel_env.site.resolve())  # the wheel's copy, not the tree
    for kind, files in sources.items():
        assert got["listed"][kind] == list(files)
        for name, sha in files.items():
            path, installed_sha = got["found"][kind][name]
            assert Path(path).resolve().is_relative_to(wheel_env.site.resolve() / "vlm_depth" / "resources" / kind)
            assert installed_sha == sha, f"{kind}/{name}.yaml differs from the shipped copy"
    assert got["unmet"] == [], "the wheel's requirements are not met by the environment"
    assert not got["bitsandbytes"]
    assert 'pip install "vlm-depth[qlora]"' in got["qlora_error"]
    assert wheel_env.run("vlm-depth", "--version").stdout.strip() == f"vlm-depth {got['version']}"


def test_wheel_trains_completes_and_evaluates_from_elsewhere(wheel_env, tiny_ckpt):
    run, cwd = wheel_env.run, wheel_env.cwd
    tiny = json.loads(run("vlm-depth", "tiny", "--out", "tiny").stdout)
    # the shipped prompt templates feed the tokenizer: same bytes as the source tree's tiny checkpoint
    assert (cwd / "tiny" / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    assert tiny["tokenizer_size"] > 0

    run(*"vlm-depth synth --out frames --num 1 --height 48 --width 64 --workers 1".split())
    frame = sorted((cwd / "frames").glob("*_rgb.png"))[0].name.removesuffix("_rgb.png")

    train = run(
        *"vlm-depth train --config tiny-synthetic --model tiny --out run --max_steps 2 --batch_size 1".split(),
        *"--dataset synthetic:2?height=48&width=64&seed=0 --queries_per_image 4".split(),
        *"--val_dataset synthetic:1?height=48&width=64&seed=1 --num_val_images 1 --val_queries_per_image 2".split(),
    )
    assert not any(w in (train.stdout + train.stderr) for w in BNB_WARNINGS), train.stderr[-2000:]
    assert (cwd / "run" / "final").is_dir()

    run(
        *"vlm-depth complete --config fast --model run/final --query_budget 16 --out completed".split(),
        *f"--rgb frames/{frame}_rgb.png --depth frames/{frame}_depth.png".split(),
    )
    assert list((cwd / "completed").glob("*_depth.npy"))

    run(*"vlm-depth eval --dataset folder:frames --baseline linear --out evaluated".split())
    assert (cwd / "evaluated" / "report.md").is_file()
