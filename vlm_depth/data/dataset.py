"""Reader registry, the lazy `RGBDDataset` base class and `load("kind:PATH")`.

A reader is a small `RGBDDataset` subclass registered under a name: its `__init__` lists the frames of one split
(cheap: paths only) and `read(item)` turns one listed item into an `RGBDSample`, converting the dataset's encoding
to float32 meters. Nothing is read until a sample is indexed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vlm_depth.data.sample import RGBDSample
from vlm_depth.errors import ConfigError, DataError

READERS: dict[str, type[RGBDDataset]] = {}

# Modules that register readers when imported; `load` imports them on first use.
_READER_MODULES = (
    "vlm_depth.data.folder",
    "vlm_depth.data.pairs",
    "vlm_depth.data.hypersim",
    "vlm_depth.data.vkitti2",
    "vlm_depth.data.nyuv2",
    "vlm_depth.data.kitti_dc",
    "vlm_depth.data.void",
    "vlm_depth.data.ibims",
    "vlm_depth.data.ddad",
    "vlm_depth.data.eth3d",
    "vlm_depth.data.synthetic",
)

R = TypeVar("R", bound="type[RGBDDataset]")


def register_reader(name: str) -> Callable[[R], R]:
    """Class decorator: make an `RGBDDataset` subclass loadable as `load(f"{name}:PATH")`."""

    def wrap(cls: R) -> R:
        if name in READERS and READERS[name] is not cls:
            raise ValueError(f"reader {name!r} is already registered by {READERS[name].__qualname__}")
        cls.kind = name
        READERS[name] = cls
        return cls

    return wrap


class RGBDDataset:
    """Indexable, lazy sequence of `RGBDSample`s: `len(ds)`, `ds[i]`, iteration.

    Subclasses set `splits` (the accepted split names, first = default), fill `self.items` in `__init__` and
    implement `read(item)`.
    """

    kind: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("all",)

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"{self.kind or type(self).__name__}: dataset path not found: {self.root}")
        split = self.splits[0] if split is None else split
        if split not in self.splits:
            raise ConfigError(f"{self.kind}: unknown split {split!r} for {self.root}; choose one of {self.splits}")
        self.split = split
        self.items: list[Any] = []

    def _require_items(self, expected: str) -> None:
        """Raise a DataError naming the root when listing found nothing (call at the end of `__init__`)."""
        if not self.items:
            raise DataError(
                f"{self.kind}: no frames found for split {self.split!r} in {self.root} (expected {expected})"
            )

    def read(self, item: Any) -> RGBDSample:
        """Read one listed item as an `RGBDSample` (depth in float32 meters)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> RGBDSample:
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} samples")
        return self.read(self.items[index])

    def __iter__(self) -> Iterator[RGBDSample]:
        for item in self.items:
            yield self.read(item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def build_sample(files: Sequence[str | Path], **fields: Any) -> RGBDSample:
    """`RGBDSample(**fields)`, with any validation error (shape, aspect ratio, dtype) naming the source files."""
    try:
        return RGBDSample(**fields)
    except DataError as exc:  # the same class (e.g. ImplausibleDepthError), now naming the files
        raise type(exc)(f"{exc} [files: {', '.join(str(f) for f in files)}]") from exc


def _import_readers() -> None:
    for module in _READER_MODULES:
        importlib.import_module(module)


def parse_spec(spec: str) -> tuple[str, str]:
    """`"kind:PATH"` -> (kind, PATH); a ConfigError listing the known kinds otherwise."""
    kind, sep, path = spec.partition(":")
    _import_readers()
    if not sep or not path or kind not in READERS:
        raise ConfigError(f"dataset spec must be KIND:PATH with KIND in {sorted(READERS)}, got {spec!r}")
    return kind, path


def load(spec: str, split: str | None = None, **kwargs: Any) -> RGBDDataset:
    """Open the dataset `spec` = `"kind:PATH"` (e.g. `"nyuv2:/data/nyu_depth_v2_labeled.mat"`, `"folder:my_scans"`).

    split: the reader's split name (None = its default); kwargs go to the reader (e.g. `depth_scale` for `folder`).
    Returns a lazy, indexable dataset of `RGBDSample` (depth in float32 meters).
    """
    kind, path = parse_spec(spec)
    reader = READERS[kind]
    try:
        inspect.signature(reader).bind(path, split=split, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{kind}: bad reader options {sorted(kwargs)} ({exc})") from exc
    return reader(path, split=split, **kwargs)
