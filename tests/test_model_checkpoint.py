"""safetensors checkpoints: identical scores after a round trip, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.batch import Batch
from model.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint, sidecar
from model.config import Arch, preset
from model.factory import build_model, random_arrays
from model.learner import OnlineLearner
from model.spec import default_live_spec
from model.synthetic import SynthConfig, make_synthetic

torch.set_num_threads(2)
SPEC = default_live_spec()


@pytest.mark.parametrize("arch", [Arch.ZENITH, Arch.ZENITH_PP, Arch.DCNV2], ids=lambda a: a.value)
def test_round_trip_gives_identical_scores_and_training(tmp_path: Path, arch: Arch) -> None:
    data = make_synthetic(SPEC, 768, seed=1, config=SynthConfig(n_users=50, n_authors=30)).arrays
    model = build_model(SPEC, preset(arch, "S", SPEC, emb_buckets=1024), "cpu")
    learner = OnlineLearner(model, SPEC)
    learner.step(data[:256])
    path = save_checkpoint(tmp_path / "v1.safetensors", model, learner=learner, extra={"offset": 256})
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_checkpoint(path, SPEC, device="cpu")
    assert loaded.meta["extra"] == {"offset": 256} and loaded.config == model.config
    batch = Batch.from_arrays(data[256:512])
    assert torch.equal(model.predict(batch), loaded.model.predict(batch))
    # with the optimizer state restored, training continues exactly as if never interrupted
    resumed = loaded.learner(SPEC, device="cpu")
    assert resumed.steps == 1
    a, b = learner.step(data[256:512]), resumed.step(data[256:512])
    assert (a.probs == b.probs).all()
    rest = Batch.from_arrays(data[512:])
    assert torch.equal(model.predict(rest), resumed.model.predict(rest))


def test_refuses_another_spec(tmp_path: Path) -> None:
    model = build_model(SPEC, preset(Arch.DLRM, "S", SPEC, emb_buckets=256), "cpu")
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    other = default_live_spec(seq_len=10)
    with pytest.raises(CheckpointMismatch, match="load it with the spec it was trained with"):
        load_checkpoint(path, other)


def test_refuses_mismatched_shapes_and_missing_sidecar(tmp_path: Path) -> None:
    model = build_model(SPEC, preset(Arch.DLRM, "S", SPEC, emb_buckets=256), "cpu")
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    meta = json.loads(sidecar(path).read_text())
    meta["config"]["mlp_hidden"] = [100, 50]  # the JSON now describes another model than the weights
    sidecar(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="shape"):
        load_checkpoint(path, SPEC, device="cpu")
    sidecar(path).unlink()
    with pytest.raises(CheckpointMismatch, match="is missing"):
        load_checkpoint(path, SPEC)


def test_weights_file_is_plain_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = build_model(SPEC, preset(Arch.ZENITH, "S", SPEC, emb_buckets=256), "cpu")
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    tensors = load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    assert model.predict(Batch.from_arrays(random_arrays(SPEC, 2))).shape == (2, len(SPEC.tasks))
