"""Reader registry, the lazy `RGBDDataset` base class and `load("kind:PATH?key=value&...")`.

A reader is a small `RGBDDataset` subclass registered under a name: its `__init__` lists the frames of one split
(cheap: paths only) and `read(item)` turns one listed item into an `RGBDSample`, converting the dataset's encoding
to float32 meters. Nothing is read until a sample is indexed.

Reader options travel in the spec itself, the same way in every command (train `--dataset`, eval `--dataset` and
suites, complete `--dataset`): `folder:scans?depth_scale=256`, `pairs:DIR?rgb=color/*.jpg&depth=depth/*.png`,
`synthetic:64?seed=1&height=96&width=128`. Values are converted to the types of the reader's keyword arguments.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections import abc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

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
    "vlm_depth.data.hf",
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


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`"kind:PATH?key=value&..."` -> (kind, PATH, {key: value}); a ConfigError listing the known kinds otherwise."""
    kind, sep, rest = spec.partition(":")
    _import_readers()
    path, _, query = rest.partition("?")
    if not sep or not path or kind not in READERS:
        raise ConfigError(
            f"dataset spec must be KIND:PATH[?key=value&...] with KIND in {sorted(READERS)}, got {spec!r}"
        )
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise ConfigError(f"{spec!r}: reader options must be ?key=value&key=value ({exc})") from exc
    return kind, path, options


def split_specs(specs: str) -> list[str]:
    """Comma-separated dataset specs -> the specs (a comma inside a spec's options, e.g. intrinsics, stays)."""
    _import_readers()
    kinds = "|".join(map(re.escape, sorted(READERS, key=len, reverse=True)))
    return [part.strip() for part in re.split(rf",(?=\s*(?:{kinds}):)", specs) if part.strip()]


def _convert(value: str, hint: Any, what: str) -> Any:
    """A reader option given as text -> the type of its annotation (bool, int, float, str or paths, number tuples;
    for a union, the first type the text fits)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null"):
            return None
        for candidate in (a for a in typing.get_args(hint) if a is not type(None)):
            try:
                return _convert(value, candidate, what)
            except ConfigError:
                continue
        raise ConfigError(f"{what}: cannot read {value!r} as {hint}")
    if hint is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{what}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if hint in (int, float):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{what}: expected {hint.__name__}, got {value!r}") from None
    if origin in (abc.Sequence, tuple, list):
        item = (typing.get_args(hint) or (str,))[0]
        return tuple(_convert(v.strip(), item, what) for v in value.split(","))
    return value


def load(spec: str, split: str | None = None, **kwargs: Any) -> RGBDDataset:
    """Open the dataset `spec` = `"kind:PATH?key=value&..."` (e.g. `"nyuv2:/data/nyu_depth_v2_labeled.mat"`,
    `"folder:my_scans?depth_scale=256"`).

    split: the reader's split name (None = its default); options of the spec and `kwargs` go to the reader (the
    keyword arguments win). Returns a lazy, indexable dataset of `RGBDSample` (depth in float32 meters).
    """
    kind, path, text_options = parse_spec(spec)
    reader = READERS[kind]
    hints = typing.get_type_hints(reader.__init__)
    known = [name for name in inspect.signature(reader).parameters if name not in ("root", "split")]
    unknown = sorted(set(text_options) - set(known))
    if unknown:
        raise ConfigError(f"{kind}: unknown reader options {unknown} in {spec!r}; {kind} accepts {known}")
    options = {k: _convert(v, hints.get(k, str), f"{kind} option {k!r}") for k, v in text_options.items()}
    options.update(kwargs)
    try:
        inspect.signature(reader).bind(path, split=split, **options)
    except TypeError as exc:
        raise ConfigError(f"{kind}: bad reader options {sorted(options)} ({exc})") from exc
    return reader(path, split=split, **options)
