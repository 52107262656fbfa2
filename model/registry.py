"""The on-disk model-version format and the registry the trainer publishes to and scorers read from.

A *version* is an immutable directory ``<root>/v{version:08d}/`` holding ``manifest.json`` and safetensors
files. Two kinds:

* ``full``  -- every dense weight (``dense.safetensors``) and every embedding table (``embeddings.safetensors``)
* ``delta`` -- every dense weight (they are small) and only the embedding rows changed since its ``parent``
  (``embedding_rows.safetensors``: ``<table>.rows`` int64 indices and ``<table>.values``), so a scorer
  applies a chain ``full -> delta -> delta ...``. The writer makes a full snapshot every ``full_every``
  versions, so a chain stays short.

Optionally ``trainer.safetensors`` (optimizer state): only a restarting trainer reads it.

Why a directory per version with a manifest written last and the whole directory renamed into place: a
rename is atomic on a POSIX filesystem, so a reader sees either a complete version or nothing; every file
is fsynced before the rename, so a crash never leaves a visible half version. Every file's sha256 is in
the manifest and checked on load, as are the tensor shapes and the feature-spec fingerprint; anything off
raises :class:`CorruptVersion` with the reason, and a scorer keeps serving what it had.

Pin/rollback: a ``PINNED`` file naming a version makes scorers serve that version instead of the latest.

>>> import tempfile
>>> from model.spec import default_live_spec
>>> from model.config import preset
>>> from model.factory import build_model
>>> spec = default_live_spec()
>>> model = build_model(spec, preset("zenith", "S", spec, emb_buckets=1024), device="cpu")
>>> registry = LocalDirRegistry(tempfile.mkdtemp())
>>> writer = VersionWriter(registry)
>>> m1 = writer.publish(model, watermark_ms=1_000, offsets={"samples:0": 10}, samples_trained=10)
>>> m2 = writer.publish(model, watermark_ms=2_000, offsets={"samples:0": 20}, samples_trained=20)
>>> (m1.version, m1.kind.value), (m2.version, m2.kind.value, m2.parent), registry.latest()
((1, 'full'), (2, 'delta', 1), 2)
>>> served, manifest = load_version(registry, 2, spec, device="cpu")
>>> manifest.watermark_ms, all(torch.equal(a, b) for a, b in zip(served.state_dict().values(),
...                                                                model.state_dict().values()))
(2000, True)
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.config import ModelConfig
from model.factory import build_model
from model.ranker import Ranker
from model.spec import FeatureSpec

log = logging.getLogger(__name__)

FORMAT = "zenith-version/1"
MANIFEST = "manifest.json"
PINNED = "PINNED"
UNUSABLE_DIR = "UNUSABLE"  # one file per version a reader found unusable (name: the version dir, text: why)
DENSE_FILE = "dense.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"  # full versions
ROWS_FILE = "embedding_rows.safetensors"  # delta versions
TRAINER_FILE = "trainer.safetensors"  # optional; only the trainer reads it
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_TMP_PREFIX = ".tmp-"


class VersionKind(StrEnum):
    FULL = "full"
    DELTA = "delta"


class RegistryError(Exception):
    """Anything the registry cannot do, with a message saying why."""


class VersionNotFound(RegistryError):
    def __init__(self, version: int, where: str) -> None:
        super().__init__(f"model version {version} does not exist (or is incomplete) in {where}")
        self.version = version


class CorruptVersion(RegistryError):
    """The version exists but must not be served: checksum, shapes, spec, parent chain or values are off."""

    def __init__(self, version: int, reason: str) -> None:
        super().__init__(f"model version {version} is unusable: {reason}")
        self.version, self.reason = version, reason


# ---- manifest ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """What a version is. ``files`` maps file name -> sha256 hex of its bytes (filled in by ``publish``)."""

    version: int
    parent: int | None  # previous version (lineage); a delta needs it, a full does not
    kind: VersionKind
    created_ms: int  # wall time the version was written
    watermark_ms: int  # newest event time of the data the weights include
    offsets: dict[str, int]  # "topic:partition" -> next offset to consume after this version
    samples_trained: int  # total samples learned from, over the model's whole life
    config: ModelConfig
    spec_fingerprint: int
    files: dict[str, str] = field(default_factory=dict)
    base: int | None = None  # the full version this chain starts from (== version for a full)
    spec_info: dict[str, Any] = field(default_factory=dict)  # spec version, seq_len, tasks: for messages
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def name(self) -> str:
        return version_dir_name(self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "version": self.version, "parent": self.parent, "kind": self.kind.value,
            "base": self.base, "created_ms": self.created_ms, "watermark_ms": self.watermark_ms,
            "offsets": dict(self.offsets), "samples_trained": self.samples_trained, "files": dict(self.files),
            "config": self.config.to_dict(), "spec_fingerprint": self.spec_fingerprint,
            "spec": dict(self.spec_info), "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any], version_hint: int = -1) -> Manifest:
        """Parse and validate; a malformed manifest raises :class:`CorruptVersion` naming the field."""
        v = d.get("version", version_hint) if isinstance(d, dict) else version_hint

        def bad(msg: str) -> CorruptVersion:
            return CorruptVersion(v if isinstance(v, int) else version_hint, f"manifest {msg}")

        if not isinstance(d, dict):
            raise bad("is not a JSON object")
        if d.get("format") != FORMAT:
            raise bad(f"has format {d.get('format')!r}; this code reads {FORMAT!r}")
        for key, typ in (("version", int), ("created_ms", int), ("watermark_ms", int), ("samples_trained", int),
                         ("spec_fingerprint", int), ("offsets", dict), ("files", dict), ("config", dict)):
            if not isinstance(d.get(key), typ) or isinstance(d.get(key), bool):
                raise bad(f"field {key!r} must be {typ.__name__}, got {d.get(key)!r}")
        if d.get("parent") is not None and not isinstance(d["parent"], int):
            raise bad(f"field 'parent' must be an int or null, got {d['parent']!r}")
        try:
            kind = VersionKind(d.get("kind"))
        except ValueError:
            raise bad(f"field 'kind' must be one of {[k.value for k in VersionKind]}, got {d.get('kind')!r}") from None
        if kind is VersionKind.DELTA and d.get("parent") is None:
            raise bad("is a delta without a parent")
        if d.get("parent") is not None and d["parent"] >= d["version"]:
            raise bad(f"parent {d['parent']} is not older than the version itself")
        try:
            config = ModelConfig.from_dict(d["config"])
        except (AssertionError, TypeError, ValueError) as exc:
            raise bad(f"config does not parse: {exc}") from None
        if not all(isinstance(k, str) and isinstance(s, str) and len(s) == 64 for k, s in d["files"].items()):
            raise bad("files must map file names to sha256 hex digests")
        if not all(isinstance(o, int) for o in d["offsets"].values()):
            raise bad("offsets must map 'topic:partition' to integer offsets")
        return Manifest(
            version=d["version"], parent=d.get("parent"), kind=kind, created_ms=d["created_ms"],
            watermark_ms=d["watermark_ms"], offsets=dict(d["offsets"]), samples_trained=d["samples_trained"],
            config=config, spec_fingerprint=d["spec_fingerprint"], files=dict(d["files"]),
            base=d.get("base"), spec_info=dict(d.get("spec") or {}), extra=dict(d.get("extra") or {}),
        )

    @staticmethod
    def from_json(text: str | bytes, version_hint: int = -1) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CorruptVersion(version_hint, f"manifest is not valid JSON ({exc})") from None
        return Manifest.from_dict(data, version_hint)


def version_dir_name(version: int) -> str:
    return f"v{version:08d}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the registry interface ------------------------------------------------------------------------------
class ModelRegistry(abc.ABC):
    """Where versions live. ``LocalDirRegistry`` is a directory (local disk or a mounted volume); an object
    store can implement the same methods (write the files, then the manifest last, as the commit point)."""

    # -- storage primitives (implement these) --
    @abc.abstractmethod
    def list_versions(self) -> list[int]:
        """Complete versions (those with a manifest), oldest first. Corrupt ones are listed too: loading
        them is what finds out."""

    @abc.abstractmethod
    def next_version(self) -> int:
        """An id greater than every version ever started here (complete or not)."""

    @abc.abstractmethod
    def read_manifest(self, version: int) -> Manifest:
        """The parsed manifest; ``VersionNotFound`` / ``CorruptVersion``."""

    @abc.abstractmethod
    def read_bytes(self, version: int, name: str) -> bytes:
        """Raw bytes of one file of a version (unverified: use ``load_file``)."""

    @abc.abstractmethod
    def write_version(self, manifest: Manifest, files: dict[str, bytes]) -> None:
        """Make the version visible atomically (all files durable before the manifest is)."""

    @abc.abstractmethod
    def delete_version(self, version: int) -> None: ...

    @abc.abstractmethod
    def pinned(self) -> int | None:
        """The version scorers must serve instead of the latest, or None."""

    @abc.abstractmethod
    def pin(self, version: int) -> None: ...

    @abc.abstractmethod
    def unpin(self) -> None: ...

    def mark_unusable(self, version: int, reason: str) -> None:
        """Record that a reader refused ``version`` (the trainer then writes a full snapshot, so the chain
        heals). A registry that cannot record it simply does nothing."""
        return None

    def unusable(self) -> dict[int, str]:
        """Versions readers refused, with why."""
        return {}

    # -- built on them --
    def latest(self) -> int | None:
        """The newest complete version, or None when there is none."""
        versions = self.list_versions()
        return versions[-1] if versions else None

    def target(self) -> int | None:
        """What a scorer should serve: the pinned version if any, else the latest."""
        pinned = self.pinned()
        return pinned if pinned is not None else self.latest()

    def publish(self, manifest: Manifest, files: dict[str, bytes]) -> Manifest:
        """Fill in the checksums and write the version; returns the manifest as stored."""
        manifest = replace(manifest, files={name: sha256_hex(data) for name, data in files.items()})
        self.write_version(manifest, files)
        return manifest

    def load_file(self, manifest: Manifest, name: str) -> bytes:
        """A file's bytes, checked against the manifest's sha256."""
        if name not in manifest.files:
            raise CorruptVersion(manifest.version, f"file {name!r} is not listed in its manifest "
                                                   f"(it has {sorted(manifest.files)})")
        try:
            data = self.read_bytes(manifest.version, name)
        except FileNotFoundError:
            raise CorruptVersion(manifest.version, f"file {name!r} is missing") from None
        digest = sha256_hex(data)
        if digest != manifest.files[name]:
            raise CorruptVersion(manifest.version, f"checksum mismatch in {name!r} (sha256 {digest[:12]}..., "
                                                   f"manifest says {manifest.files[name][:12]}...)")
        return data

    def load_tensors(self, manifest: Manifest, name: str) -> dict[str, torch.Tensor]:
        data = self.load_file(manifest, name)
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptVersion(manifest.version, f"{name!r} is not a readable safetensors file ({exc})") from None

    def chain(self, version: int) -> list[Manifest]:
        """Manifests from the full snapshot ``version`` builds on up to ``version`` itself, oldest first."""
        out = [self.read_manifest(version)]
        while out[-1].kind is VersionKind.DELTA:
            parent = out[-1].parent
            assert parent is not None  # Manifest.from_dict guarantees it for deltas
            try:
                out.append(self.read_manifest(parent))
            except VersionNotFound:
                raise CorruptVersion(version, f"its delta chain needs version {parent}, which is missing "
                                              f"(pruned, or never completed)") from None
            except CorruptVersion as exc:
                raise CorruptVersion(version, f"its delta chain needs version {parent}: {exc.reason}") from None
        return out[::-1]


class LocalDirRegistry(ModelRegistry):
    """Versions as directories under ``root`` (local disk or a mounted volume).

    >>> import tempfile
    >>> reg = LocalDirRegistry(tempfile.mkdtemp())
    >>> reg.latest(), reg.pinned(), reg.next_version()
    (None, None, 1)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalDirRegistry({str(self.root)!r})"

    def _dir(self, version: int) -> Path:
        return self.root / version_dir_name(version)

    def _scan(self) -> Iterator[tuple[int, Path]]:
        with os.scandir(self.root) as it:
            for entry in it:
                m = _VERSION_DIR.match(entry.name)
                if m and entry.is_dir():
                    yield int(m.group(1)), Path(entry.path)

    def list_versions(self) -> list[int]:
        return sorted(v for v, path in self._scan() if (path / MANIFEST).is_file())

    def next_version(self) -> int:
        return max((v for v, _ in self._scan()), default=0) + 1

    def read_manifest(self, version: int) -> Manifest:
        try:
            text = (self._dir(version) / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(version, str(self.root)) from None
        manifest = Manifest.from_json(text, version)
        if manifest.version != version:
            raise CorruptVersion(version, f"its manifest says it is version {manifest.version} "
                                          f"(directory copied or renamed by hand?)")
        return manifest

    def read_bytes(self, version: int, name: str) -> bytes:
        if "/" in name or name.startswith("."):
            raise CorruptVersion(version, f"file name {name!r} is not a plain file name")
        return (self._dir(version) / name).read_bytes()

    def write_version(self, manifest: Manifest, files: dict[str, bytes]) -> None:
        final = self._dir(manifest.version)
        if final.exists():
            raise RegistryError(f"version {manifest.version} already exists in {self.root}: is another "
                                f"trainer publishing to this registry?")
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                _write_durable(tmp / name, data)
            _write_durable(tmp / MANIFEST, manifest.to_json().encode())  # the commit marker, written last
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)  # atomic; fails if another writer took the name meanwhile
            except OSError as exc:
                raise RegistryError(f"could not move version {manifest.version} into place ({exc}): "
                                    f"is another trainer publishing to this registry?") from None
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def delete_version(self, version: int) -> None:
        # Rename first so readers never see a version whose files are half deleted.
        path = self._dir(version)
        if not path.exists():
            return
        doomed = self.root / f"{_TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def pinned(self) -> int | None:
        try:
            text = (self.root / PINNED).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise RegistryError(f"{self.root / PINNED} must hold a version number, got {text[:40]!r}: "
                                f"fix it with `zenith model pin VERSION` or `zenith model unpin`")
        return int(text)

    def pin(self, version: int) -> None:
        if version not in self.list_versions():
            raise VersionNotFound(version, str(self.root))
        _write_durable(self.root / f"{PINNED}.tmp", f"{version}\n".encode())
        os.replace(self.root / f"{PINNED}.tmp", self.root / PINNED)
        _fsync_dir(self.root)

    def unpin(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / PINNED).unlink()
            _fsync_dir(self.root)

    def mark_unusable(self, version: int, reason: str) -> None:
        folder = self.root / UNUSABLE_DIR
        folder.mkdir(exist_ok=True)
        target = folder / version_dir_name(version)
        if target.exists():
            return
        tmp = folder / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
        _write_durable(tmp, reason.encode()[:4096])
        os.replace(tmp, target)

    def unusable(self) -> dict[int, str]:
        folder = self.root / UNUSABLE_DIR
        if not folder.is_dir():
            return {}
        out = {}
        for entry in folder.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m:
                with contextlib.suppress(OSError):
                    out[int(m.group(1))] = entry.read_text(errors="replace")
        return out

    def size_bytes(self, version: int) -> int:
        return sum(p.stat().st_size for p in self._dir(version).iterdir() if p.is_file())

    def prune(self, keep_fulls: int, stale_tmp_s: float = 600.0) -> list[int]:
        """Delete versions no longer needed: keep everything from the ``keep_fulls``-th newest full snapshot
        on, plus the pinned version's chain. Also removes temp dirs of crashed writers. Returns deleted ids."""
        assert keep_fulls >= 1, "keep_fulls must be >= 1: the latest chain needs its full snapshot"
        now = time.time()
        for entry in list(self.root.iterdir()):
            if entry.name.startswith(_TMP_PREFIX) and now - entry.stat().st_mtime > stale_tmp_s:
                shutil.rmtree(entry, ignore_errors=True)
        versions = self.list_versions()
        fulls = []
        for v in reversed(versions):
            try:
                if self.read_manifest(v).kind is VersionKind.FULL:
                    fulls.append(v)
            except RegistryError:
                continue
            if len(fulls) >= keep_fulls:
                break
        if len(fulls) < keep_fulls:
            return []
        keep = {v for v in versions if v >= fulls[-1]}
        with contextlib.suppress(RegistryError):
            pinned = self.pinned()
            if pinned is not None:
                keep |= {m.version for m in self.chain(pinned)}
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            self.delete_version(v)
        for v in self.unusable():
            if v < fulls[-1] and v not in keep:
                with contextlib.suppress(OSError):
                    (self.root / UNUSABLE_DIR / version_dir_name(v)).unlink()
        return doomed


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- model <-> tensors -------------------------------------------------------------------------------------
def table_keys(model: Ranker) -> dict[str, str]:
    """Embedding table name -> its weight's state-dict key."""
    by_id = {id(p): k for k, p in model.named_parameters()}
    return {name: by_id[id(t.weight)] for name, t in model.embedding_tables().items()}


def dense_state(model: Ranker) -> dict[str, torch.Tensor]:
    """Every state-dict entry that is not an embedding table (weights, biases, persistent buffers)."""
    skip = set(table_keys(model).values())
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _st_bytes(tensors: dict[str, torch.Tensor], manifest_version: int, kind: str) -> bytes:
    return st_save(tensors, metadata={"format": FORMAT, "version": str(manifest_version), "kind": kind})


def _check_shapes(version: int, what: str, expected: dict[str, tuple[int, ...]],
                  got: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(got[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
            "shapes " + ", ".join(f"{k}: file {tuple(got[k].shape)} vs model {expected[k]}" for k in wrong[:4])
            if wrong else "") if s)
        raise CorruptVersion(version, f"{what} does not fit the model its manifest describes ({detail})")


def _check_finite(version: int, what: str, tensors: dict[str, torch.Tensor]) -> None:
    # Why: a diverged trainer publishes NaN/inf weights with perfectly valid checksums; never serve them.
    # One reduction per tensor (NaN and inf propagate through a sum; ~10x cheaper than isfinite().all()).
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())):
            raise CorruptVersion(version, f"{what} has non-finite values in {k!r} (did training diverge?)")


def _load_dense(model: Ranker, registry: ModelRegistry, manifest: Manifest) -> None:
    tensors = registry.load_tensors(manifest, DENSE_FILE)
    expected = {k: tuple(v.shape) for k, v in dense_state(model).items()}
    _check_shapes(manifest.version, DENSE_FILE, expected, tensors)
    _check_finite(manifest.version, DENSE_FILE, tensors)
    model.load_state_dict(tensors, strict=False)  # strict on dense keys was checked just above


def _load_full_tables(model: Ranker, registry: ModelRegistry, manifest: Manifest) -> None:
    tensors = registry.load_tensors(manifest, EMBEDDINGS_FILE)
    tables = model.embedding_tables()
    _check_shapes(manifest.version, EMBEDDINGS_FILE, {n: tuple(t.weight.shape) for n, t in tables.items()}, tensors)
    _check_finite(manifest.version, EMBEDDINGS_FILE, tensors)
    with torch.no_grad():
        for name, table in tables.items():
            table.weight.copy_(tensors[name])


def _apply_rows(model: Ranker, registry: ModelRegistry, manifest: Manifest) -> None:
    tensors = registry.load_tensors(manifest, ROWS_FILE)
    tables = model.embedding_tables()
    v = manifest.version
    names = {k.rsplit(".", 1)[0] for k in tensors}
    unknown = names - set(tables)
    if unknown:
        raise CorruptVersion(v, f"{ROWS_FILE} has rows for unknown tables {sorted(unknown)} (model has "
                                f"{sorted(tables)})")
    _check_finite(v, ROWS_FILE, tensors)
    updates = []
    for name in sorted(names):
        rows, values = tensors.get(f"{name}.rows"), tensors.get(f"{name}.values")
        table = tables[name]
        if rows is None or values is None:
            raise CorruptVersion(v, f"{ROWS_FILE} has only one of {name}.rows / {name}.values")
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise CorruptVersion(v, f"{name}.rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
        if tuple(values.shape) != (len(rows), table.dim):
            raise CorruptVersion(v, f"{name}.values has shape {tuple(values.shape)}, expected "
                                    f"({len(rows)}, {table.dim})")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= table.num_rows):
            raise CorruptVersion(v, f"{name}.rows has indices outside 0..{table.num_rows - 1}")
        updates.append((table, rows, values))
    for table, rows, values in updates:  # only after every table checked out: no half-applied delta
        table.set_rows(rows, values)


def _check_compatible(m: Manifest, spec: FeatureSpec, config: ModelConfig | None = None) -> None:
    if m.spec_fingerprint != spec.fingerprint():
        raise CorruptVersion(m.version, f"it was trained for feature spec fingerprint {m.spec_fingerprint} "
                                        f"({m.spec_info or 'no spec details'}), but this process's spec is "
                                        f"{spec.fingerprint()} (version {spec.version}, seq_len {spec.seq_len}): "
                                        f"serve it with the spec it was trained with")
    if config is not None and m.config != config:
        raise CorruptVersion(m.version, "its model config differs from its parent's: a delta must extend a "
                                        "model of the same architecture")


# ---- reading: scorers and trainers ---------------------------------------------------------------------------
def load_version(registry: ModelRegistry, version: int, spec: FeatureSpec,
                 device: torch.device | str = "cpu") -> tuple[Ranker, Manifest]:
    """Build the model of ``version`` from scratch: its full snapshot, then each delta in order.

    Every file is checksum-verified, every tensor shape-checked; raises :class:`CorruptVersion` (or
    :class:`VersionNotFound`). The model is returned in eval mode on ``device``.
    """
    chain = registry.chain(version)
    target = chain[-1]
    for m in chain:
        _check_compatible(m, spec, target.config)
    try:
        model = build_model(spec, target.config, device="cpu")
    except (AssertionError, ValueError) as exc:
        raise CorruptVersion(version, f"its config does not build a model for this spec ({exc})") from None
    try:
        _load_dense(model, registry, chain[0])
        _load_full_tables(model, registry, chain[0])
        for m in chain[1:]:
            _apply_rows(model, registry, m)
        if len(chain) > 1:
            _load_dense(model, registry, target)  # dense weights are complete in every version: the last wins
    except CorruptVersion as exc:
        if exc.version == version:
            raise
        raise CorruptVersion(version, f"its chain member {exc}") from None
    return model.to(device).eval(), target


def apply_version(model: Ranker, registry: ModelRegistry, version: int, *, held_version: int | None,
                  inplace: bool = False) -> tuple[Ranker, Manifest]:
    """The model of ``version``, made from ``model`` (which is at ``held_version``) where possible.

    If ``version`` is a chain of deltas leading back to ``held_version``, those deltas are applied to a deep
    copy of ``model`` (or to ``model`` itself with ``inplace=True``) -- a scorer keeps serving the original
    meanwhile. Otherwise (a full snapshot, a rollback, a gap) it falls back to :func:`load_version`.
    Either way every file is verified first and a bad version raises :class:`CorruptVersion`.
    """
    spec = model.spec
    device = next(model.parameters()).device
    target = registry.read_manifest(version)
    if held_version is None or target.kind is VersionKind.FULL or version <= held_version:
        return load_version(registry, version, spec, device)
    chain = registry.chain(version)
    at = next((i for i, m in enumerate(chain) if m.version == held_version), None)
    if at is None:  # the held version is not on this version's chain (rollback, gap, new full): start over
        return load_version(registry, version, spec, device)
    path = chain[at + 1:]
    for m in path:
        _check_compatible(m, spec, model.config)
    out = model if inplace else copy.deepcopy(model)
    try:
        for m in path:
            _apply_rows(out, registry, m)
        _load_dense(out, registry, target)
    except CorruptVersion as exc:
        if exc.version == version:
            raise
        raise CorruptVersion(version, f"its chain member {exc}") from None
    return out.eval(), target


def load_trainer_state(registry: ModelRegistry, manifest: Manifest) -> dict[str, torch.Tensor] | None:
    """The ``trainer_state`` tensors published with ``manifest``, or None if it had none."""
    if TRAINER_FILE not in manifest.files:
        return None
    return registry.load_tensors(manifest, TRAINER_FILE)


def verify_files(registry: ModelRegistry, manifest: Manifest) -> None:
    """Every file of this one version (not its chain) against its manifest's checksums; ``CorruptVersion``."""
    for name in manifest.files:
        registry.load_file(manifest, name)


def newest_verifiable(registry: ModelRegistry, spec: FeatureSpec, refused: dict[int, str],
                      verified: set[int] | None = None) -> int | None:
    """The newest version whose whole chain verifies (manifests, checksums, spec), walking back from the
    latest; None if there is none. Every version found unusable on the way is added to ``refused``
    (version -> reason), and a version whose chain holds a refused member is skipped without reading its
    files, so deltas that do not depend on a refused member stay eligible. ``verified``: versions already
    known good (filled in too). A fresh scorer uses this instead of refusing to serve when the latest is bad.
    """
    verified = set() if verified is None else verified
    for v in reversed(registry.list_versions()):
        if v in refused:
            continue
        try:
            chain = registry.chain(v)
        except VersionNotFound:
            continue  # pruned meanwhile
        except CorruptVersion as exc:
            refused[v] = exc.reason
            continue
        bad = next((m.version for m in chain if m.version in refused), None)
        if bad is not None:
            refused[v] = f"its delta chain needs version {bad}, which is unusable ({refused[bad]})"
            continue
        try:
            for m in chain:
                _check_compatible(m, spec, chain[-1].config)
                if m.version not in verified:
                    verify_files(registry, m)
                    verified.add(m.version)
        except CorruptVersion as exc:
            refused.setdefault(exc.version, exc.reason)
            if exc.version != v:
                refused[v] = f"its delta chain needs version {exc.version}, which is unusable ({exc.reason})"
            continue
        return v
    return None


# ---- writing: the trainer -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriterConfig:
    full_every: int = 20  # a full snapshot after this many deltas (bounds a scorer's catch-up chain)
    delta_max_fraction: float = 0.5  # a delta touching more than this share of all rows is written full
    keep_fulls: int | None = 3  # retention: keep the chains of the newest N full snapshots (None: keep all)

    def __post_init__(self) -> None:
        assert self.full_every >= 1, f"full_every must be >= 1 (1 = every version full), got {self.full_every}"
        assert 0 < self.delta_max_fraction <= 1, "delta_max_fraction must be in (0, 1]"
        assert self.keep_fulls is None or self.keep_fulls >= 1, "keep_fulls must be None or >= 1"


@dataclass
class PreparedVersion:
    """A version's tensors, copied off the model: ``VersionWriter.commit`` writes it (slow IO, may run in
    another thread while training goes on)."""

    manifest: Manifest
    files: dict[str, bytes]


class Resumed(NamedTuple):
    model: Ranker
    manifest: Manifest
    trainer_state: dict[str, torch.Tensor] | None


class VersionWriter:
    """Publishes a trainer's model as versions: full, or a delta of the embedding rows touched since the last.

    Call ``publish`` between training steps (never between a forward and its optimizer step): the delta is
    the rows ``touched_rows()`` reports, and ``clear_touched()`` is called once they are captured. If writing
    fails, the next version is written full, so no changed row can be lost from the chain.
    """

    def __init__(self, registry: ModelRegistry, config: WriterConfig | None = None) -> None:
        self.registry = registry
        self.config = config or WriterConfig()
        self.last: Manifest | None = None  # the version the model's current touched-row set is relative to
        self._deltas_since_full = 0
        self._force_full = False

    def prepare(self, model: Ranker, *, watermark_ms: int, offsets: dict[str, int], samples_trained: int,
                extra: dict[str, Any] | None = None, trainer_state: dict[str, torch.Tensor] | None = None,
                full: bool = False) -> PreparedVersion:
        """Copy what the next version needs off ``model`` and clear its touched rows (fast)."""
        spec, config = model.spec, model.config
        tables = model.embedding_tables()
        touched = {name: t.touched_rows().to("cpu") for name, t in tables.items()}
        last = self.last
        n_touched = sum(len(r) for r in touched.values())
        n_rows = sum(t.num_rows for t in tables.values())
        want_full = (full or self._force_full or last is None or self._chain_refused(last)
                     or self._deltas_since_full + 1 >= self.config.full_every
                     or last.config != config or last.spec_fingerprint != spec.fingerprint()
                     or n_touched > self.config.delta_max_fraction * n_rows)
        kind = VersionKind.FULL if want_full else VersionKind.DELTA
        version = max(self.registry.next_version(), (last.version + 1) if last else 1)
        files: dict[str, bytes] = {}
        files[DENSE_FILE] = _st_bytes({k: _cpu(v) for k, v in dense_state(model).items()}, version, kind)
        if kind is VersionKind.FULL:
            files[EMBEDDINGS_FILE] = _st_bytes({n: _cpu(t.weight) for n, t in tables.items()}, version, kind)
        else:
            rows_t: dict[str, torch.Tensor] = {}
            for name, table in tables.items():
                rows = touched[name]
                if len(rows):
                    rows_t[f"{name}.rows"] = rows.to(torch.int64).contiguous()
                    rows_t[f"{name}.values"] = _cpu(table.get_rows(rows))
            files[ROWS_FILE] = _st_bytes(rows_t, version, kind)
        if trainer_state:
            files[TRAINER_FILE] = _st_bytes({k: _cpu(v) for k, v in trainer_state.items()}, version, kind)
        for t in tables.values():
            t.clear_touched()
        manifest = Manifest(
            version=version, parent=last.version if last else None, kind=kind,
            created_ms=int(time.time() * 1000), watermark_ms=int(watermark_ms),
            offsets={str(k): int(v) for k, v in offsets.items()}, samples_trained=int(samples_trained),
            config=config, spec_fingerprint=spec.fingerprint(),
            base=version if kind is VersionKind.FULL else (last.base if last else None),
            spec_info={"version": spec.version, "seq_len": spec.seq_len, "tasks": [t.name for t in spec.tasks]},
            extra={**(extra or {}), "touched_rows": n_touched} if kind is VersionKind.DELTA else dict(extra or {}),
        )
        # Until commit succeeds the writer must assume the rows just cleared are not published anywhere.
        self._force_full = True
        return PreparedVersion(manifest, files)

    def _chain_refused(self, last: Manifest) -> bool:
        """A reader refused a member of the chain the next delta would extend: write full so it heals."""
        try:
            refused = self.registry.unusable()
        except OSError:
            return False
        base = last.base if last.base is not None else last.version
        hit = sorted(v for v in refused if base <= v <= last.version)
        if hit:
            log.warning("version(s) %s of the current chain were found unusable (%s): writing a full snapshot",
                        hit, refused[hit[0]][:200])
        return bool(hit)

    def commit(self, prepared: PreparedVersion) -> Manifest:
        """Write a prepared version durably; returns the stored manifest (checksums filled in)."""
        # created_ms is stamped at write time, not prepare time: published->served freshness measures from it.
        manifest = replace(prepared.manifest, created_ms=int(time.time() * 1000))
        manifest = self.registry.publish(manifest, prepared.files)
        self.last = manifest
        self._force_full = False
        self._deltas_since_full = 0 if manifest.kind is VersionKind.FULL else self._deltas_since_full + 1
        if self.config.keep_fulls is not None and manifest.kind is VersionKind.FULL and \
                isinstance(self.registry, LocalDirRegistry):
            try:
                deleted = self.registry.prune(self.config.keep_fulls)
                if deleted:
                    log.info("pruned model versions %s..%s", deleted[0], deleted[-1])
            except OSError as exc:  # retention is housekeeping: never fail a publish for it
                log.warning("pruning old model versions failed: %s", exc)
        return manifest

    def publish(self, model: Ranker, *, watermark_ms: int, offsets: dict[str, int], samples_trained: int,
                extra: dict[str, Any] | None = None, trainer_state: dict[str, torch.Tensor] | None = None,
                full: bool = False) -> Manifest:
        """Write the next version of ``model`` (full or delta, see ``WriterConfig``) and return its manifest.

        ``offsets``: "topic:partition" -> next offset to consume; commit them to Kafka only after this
        returns (the version that includes them is durable). ``full=True`` forces a full snapshot.
        """
        return self.commit(self.prepare(model, watermark_ms=watermark_ms, offsets=offsets,
                                        samples_trained=samples_trained, extra=extra,
                                        trainer_state=trainer_state, full=full))

    def load_latest_for_training(self, spec: FeatureSpec, device: torch.device | str = "cpu") -> Resumed | None:
        """The newest *good* version as a trainable model (train mode), its manifest and trainer state.

        Corrupt newer versions are skipped with a warning (their ids stay taken: the next publish gets a
        newer id, so ids only increase). Returns None when the registry holds no loadable version; the
        writer then continues from the returned version (the next publish is a delta on it).
        """
        for v in reversed(self.registry.list_versions()):
            try:
                model, manifest = load_version(self.registry, v, spec, device)
                state = load_trainer_state(self.registry, manifest)
            except CorruptVersion as exc:
                log.warning("skipping version %s for resume: %s", v, exc)
                with contextlib.suppress(OSError):  # so scorers and operators see it too
                    self.registry.mark_unusable(v, exc.reason)
                continue
            model.train()
            for t in model.embedding_tables().values():
                t.clear_touched()
            self.last = manifest
            self._force_full = False
            self._deltas_since_full = len(self.registry.chain(v)) - 1
            return Resumed(model, manifest, state)
        return None
