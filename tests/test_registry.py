"""Model-version registry: full/delta round trips, durability, refusal of bad versions, pin/rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.batch import Batch
from model.config import Arch, preset
from model.factory import build_model
from model.learner import OnlineLearner
from model.registry import (
    DENSE_FILE,
    MANIFEST,
    ROWS_FILE,
    CorruptVersion,
    LocalDirRegistry,
    Manifest,
    RegistryError,
    VersionKind,
    VersionNotFound,
    VersionWriter,
    WriterConfig,
    apply_version,
    load_version,
    sha256_hex,
)
from model.spec import default_live_spec
from model.synthetic import SynthConfig, make_synthetic

torch.set_num_threads(2)
SPEC = default_live_spec()
DATA = make_synthetic(SPEC, 1024, seed=3, config=SynthConfig(n_users=40, n_authors=30)).arrays
EVAL = Batch.from_arrays(DATA[768:])


def _trainer(arch: Arch = Arch.ZENITH) -> OnlineLearner:
    return OnlineLearner(build_model(SPEC, preset(arch, "S", SPEC, emb_buckets=2048), "cpu"), SPEC)


def _publish(writer: VersionWriter, learner: OnlineLearner, **kw: object):
    n = learner.samples
    return writer.publish(learner.model, watermark_ms=1_000 + n, offsets={"samples:0": n}, samples_trained=n, **kw)


def _flip_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("arch", [Arch.ZENITH, Arch.ZENITH_PP], ids=lambda a: a.value)
def test_full_then_deltas_reproduce_the_trainers_model(tmp_path: Path, arch: Arch) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg), _trainer(arch)
    learner.step(DATA[:128])
    v1 = _publish(writer, learner)
    scorer, held = load_version(reg, v1.version, SPEC)  # a scorer at v1
    before = scorer.predict(EVAL)
    manifests = [v1]
    for lo in (128, 256, 384):
        learner.step(DATA[lo:lo + 128])
        manifests.append(_publish(writer, learner, extra={"note": lo}))
    assert [m.kind for m in manifests] == [VersionKind.FULL] + [VersionKind.DELTA] * 3
    assert [m.parent for m in manifests] == [None, 1, 2, 3] and all(m.base == 1 for m in manifests)
    last = manifests[-1]
    assert last.offsets == {"samples:0": 512} and last.watermark_ms == 1_512 and last.extra["note"] == 384
    assert 0 < last.extra["touched_rows"] < 4 * 2048 * len(learner.model.embedding_tables())
    assert set(last.files) == {DENSE_FILE, ROWS_FILE}
    expected = learner.model.predict(EVAL)

    fresh, m = load_version(reg, last.version, SPEC)  # from scratch: full + 3 deltas
    assert m == last and torch.equal(fresh.predict(EVAL), expected)
    applied, m = apply_version(scorer, reg, last.version, held_version=held.version)  # deltas on a copy
    assert m.version == 4 and torch.equal(applied.predict(EVAL), expected)
    assert applied is not scorer and torch.equal(scorer.predict(EVAL), before)  # the served copy is untouched
    assert all(torch.equal(a, b) for a, b in zip(applied.state_dict().values(),
                                                  learner.model.state_dict().values(), strict=True))
    # a rollback (older target) or an unknown held version falls back to a full load
    old, m = apply_version(applied, reg, 2, held_version=4)
    assert m.version == 2 and torch.equal(old.predict(EVAL), load_version(reg, 2, SPEC)[0].predict(EVAL))


def test_periodic_full_snapshots_and_retention(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg, WriterConfig(full_every=3, keep_fulls=2)), _trainer()
    kinds = []
    for i in range(8):
        learner.step(DATA[32 * i: 32 * i + 32])
        kinds.append(_publish(writer, learner).kind.value)
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full", "delta"]
    assert reg.list_versions() == [4, 5, 6, 7, 8]  # chains of the two newest fulls (4 and 7) kept
    assert torch.equal(load_version(reg, 8, SPEC)[0].predict(EVAL), learner.model.predict(EVAL))


def test_corrupt_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg), _trainer()
    for lo in (0, 64, 128):
        learner.step(DATA[lo:lo + 64])
        _publish(writer, learner)
    _flip_byte(tmp_path / "v00000002" / ROWS_FILE)
    with pytest.raises(CorruptVersion, match=r"version 2 is unusable: checksum mismatch in 'embedding_rows"):
        load_version(reg, 2, SPEC)
    with pytest.raises(CorruptVersion, match=r"version 3 is unusable: its chain member .*version 2.*checksum"):
        load_version(reg, 3, SPEC)
    held, _ = load_version(reg, 1, SPEC)
    with pytest.raises(CorruptVersion, match="checksum"):
        apply_version(held, reg, 3, held_version=1)

    # a file whose checksum was "fixed" but whose shapes do not fit the manifest's config
    other = build_model(SPEC, preset(Arch.ZENITH, "S", SPEC, d_model=24, rsa_k=12, emb_buckets=2048), "cpu")
    v1 = tmp_path / "v00000001"
    from model.registry import _st_bytes, dense_state  # same serialisation the writer uses
    data = _st_bytes({k: v.contiguous() for k, v in dense_state(other).items()}, 1, "full")
    (v1 / DENSE_FILE).write_bytes(data)
    manifest = json.loads((v1 / MANIFEST).read_text())
    manifest["files"][DENSE_FILE] = sha256_hex(data)
    (v1 / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersion, match=r"version 1 is unusable: dense.safetensors does not fit .*shapes"):
        load_version(reg, 1, SPEC)

    # another feature spec, a missing parent, a garbled manifest
    with pytest.raises(CorruptVersion, match="feature spec fingerprint"):
        load_version(reg, 1, default_live_spec(seq_len=10))
    (v1 / MANIFEST).unlink()
    with pytest.raises(CorruptVersion, match="needs version 1, which is missing"):
        load_version(reg, 3, SPEC)
    (tmp_path / "v00000003" / MANIFEST).write_text('{"format": "zenith-version/1", "version": 3')
    with pytest.raises(CorruptVersion, match="manifest is not valid JSON"):
        load_version(reg, 3, SPEC)
    with pytest.raises(VersionNotFound):
        load_version(reg, 42, SPEC)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    learner = _trainer()
    with torch.no_grad():
        next(learner.model.dense_parameters()).fill_(float("nan"))
    VersionWriter(reg).publish(learner.model, watermark_ms=0, offsets={}, samples_trained=0)
    with pytest.raises(CorruptVersion, match="non-finite values"):
        load_version(reg, 1, SPEC)


def test_partial_versions_are_invisible(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg), _trainer()
    _publish(writer, learner)
    (tmp_path / "v00000002").mkdir()  # a crashed copy: files, no manifest
    (tmp_path / "v00000002" / DENSE_FILE).write_bytes(b"half")
    (tmp_path / ".tmp-v00000003-1-abc").mkdir()  # a writer's temp dir
    assert reg.list_versions() == [1] and reg.latest() == 1
    m = _publish(writer, learner)
    assert m.version == 3 and m.parent == 1 and reg.list_versions() == [1, 3]  # ids never reused


def test_pin_and_unpin(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg), _trainer()
    for _ in range(3):
        _publish(writer, learner)
    assert reg.pinned() is None and reg.target() == 3
    reg.pin(2)
    assert reg.pinned() == 2 and reg.target() == 2 and reg.latest() == 3
    with pytest.raises(VersionNotFound, match="version 7 does not exist"):
        reg.pin(7)
    reg.unpin()
    reg.unpin()  # idempotent
    assert reg.pinned() is None and reg.target() == 3
    (tmp_path / "PINNED").write_text("latest please")
    with pytest.raises(RegistryError, match="must hold a version number"):
        reg.pinned()


def test_resume_for_training_skips_corrupt_and_continues_the_chain(tmp_path: Path) -> None:
    reg = LocalDirRegistry(tmp_path)
    writer, learner = VersionWriter(reg), _trainer()
    assert writer.load_latest_for_training(SPEC) is None
    learner.step(DATA[:128])
    state = {"dense.exp_avg": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor(1)}
    good = _publish(writer, learner, trainer_state=state)
    expected = learner.model.predict(EVAL)
    learner.step(DATA[128:256])
    _publish(writer, learner)
    _flip_byte(tmp_path / "v00000002" / DENSE_FILE)

    writer2 = VersionWriter(reg)  # a restarted trainer
    resumed = writer2.load_latest_for_training(SPEC)
    assert resumed is not None
    model, manifest, trainer_state = resumed
    assert manifest == good and model.training and torch.equal(model.predict(EVAL), expected)
    assert list(reg.unusable()) == [2] and "checksum" in reg.unusable()[2]  # recorded for scorers too
    assert trainer_state is not None and torch.equal(trainer_state["dense.exp_avg"], state["dense.exp_avg"])
    learner2 = OnlineLearner(model, SPEC)
    learner2.step(DATA[128:256])
    nxt = writer2.publish(model, watermark_ms=5, offsets={"samples:0": 256}, samples_trained=256)
    assert (nxt.version, nxt.kind, nxt.parent) == (3, VersionKind.DELTA, 1)
    assert torch.equal(load_version(reg, 3, SPEC)[0].predict(EVAL), model.predict(EVAL))


def test_a_failed_write_makes_the_next_version_full(tmp_path: Path) -> None:
    class Flaky(LocalDirRegistry):
        fail = False

        def write_version(self, manifest: Manifest, files: dict[str, bytes]) -> None:
            if self.fail:
                self.fail = False
                raise OSError("disk full")
            super().write_version(manifest, files)

    reg = Flaky(tmp_path)
    writer, learner = VersionWriter(reg), _trainer()
    _publish(writer, learner)  # v1 full
    reg.fail = True
    learner.step(DATA[:64])
    with pytest.raises(OSError):
        _publish(writer, learner)  # its touched rows were cleared: they must not be lost
    learner.step(DATA[64:128])
    m = _publish(writer, learner)
    assert m.kind is VersionKind.FULL
    assert torch.equal(load_version(reg, m.version, SPEC)[0].predict(EVAL), learner.model.predict(EVAL))
