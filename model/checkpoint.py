"""Save and load rankers with safetensors (no pickle), their config and spec fingerprint as JSON alongside.

``save_checkpoint(path, model)`` writes ``path`` (``*.safetensors``: every weight, plus optimizer state
tensors when a learner is given) and ``path.with_suffix(".json")`` (format, ``ModelConfig``, spec
fingerprint, tensor shapes, optimizer hyper-parameters). Both are written to a temporary name and renamed,
so a reader never sees half a file. ``load_checkpoint(path, spec)`` rebuilds the model from the JSON config
and refuses, with a message saying what to do, a checkpoint made for another feature spec or whose
tensors do not match the architecture.

>>> import tempfile, pathlib
>>> from model.spec import default_live_spec
>>> from model.config import preset
>>> from model.factory import build_model, default_device
>>> spec = default_live_spec()
>>> model = build_model(spec, preset("dlrm", "S", spec), device="cpu")
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
>>> _ = save_checkpoint(path, model)
>>> loaded = load_checkpoint(path, spec, device="cpu")
>>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.factory import build_model, default_device
from model.learner import OnlineLearner
from model.ranker import Ranker
from model.spec import FeatureSpec

FORMAT = "zenith-ranker/1"
_OPT = "__optim__"
_COUNTERS = ("steps", "samples")  # scalars stored beside the per-optimizer entries of the metadata


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the spec or architecture it is being loaded into."""


@dataclass
class LoadedCheckpoint:
    model: Ranker
    config: ModelConfig
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)  # for OnlineLearner.load_optimizer_state

    def learner(self, spec: FeatureSpec, device: torch.device | str | None = None) -> OnlineLearner:
        """A learner over the loaded model, its optimizer state restored if the checkpoint had one."""
        learner = OnlineLearner(self.model, spec, self.config, device)
        if self.optimizer_state is not None:
            learner.load_optimizer_state(self.optimizer_state)
        return learner


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, model: Ranker, learner: OnlineLearner | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights (and the learner's optimizer state, if given) to ``path`` and metadata beside it."""
    path = Path(path)
    assert path.suffix == ".safetensors", f"checkpoint path must end in .safetensors, got {path.name!r}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    optim_meta: dict[str, Any] | None = None
    if learner is not None:
        optim_meta = {}
        for which, opt in learner.optimizers().items():
            sd = opt.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for pid, st in sd["state"].items():
                for key, val in st.items():
                    if torch.is_tensor(val):
                        tensors[f"{_OPT}.{which}.{pid}.{key}"] = val.detach().to("cpu").contiguous().clone()
                    else:
                        scalars.setdefault(str(pid), {})[key] = val
            optim_meta[which] = {"param_groups": sd["param_groups"], "scalars": scalars,
                                 "state_ids": [str(p) for p in sd["state"]]}
        optim_meta["steps"], optim_meta["samples"] = learner.steps, learner.samples
    spec = model.spec
    meta = {
        "format": FORMAT, "config": model.config.to_dict(), "spec_fingerprint": spec.fingerprint(),
        "spec_version": spec.version, "tasks": [t.name for t in spec.tasks], "n_tokens": spec.n_tokens(),
        "tensors": {k: list(v.shape) for k, v in tensors.items() if not k.startswith(_OPT)},
        "optimizer": optim_meta, "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "spec_fingerprint": str(spec.fingerprint())})
    os.replace(tmp, path)
    meta_tmp = sidecar(path).with_name(sidecar(path).name + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(meta_tmp, sidecar(path))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = sidecar(path)
    if not meta_path.exists():
        raise CheckpointMismatch(f"{meta_path} is missing: a checkpoint is the .safetensors file plus its .json")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"{meta_path} has format {meta.get('format')!r}, this code reads {FORMAT!r}")
    return meta


def load_checkpoint(path: str | Path, spec: FeatureSpec, device: torch.device | str | None = None
                    ) -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint's config and load its weights onto ``device``."""
    path = Path(path)
    meta = read_meta(path)
    if meta["spec_fingerprint"] != spec.fingerprint():
        raise CheckpointMismatch(
            f"{path.name} was trained for feature spec fingerprint {meta['spec_fingerprint']} (version "
            f"{meta['spec_version']}, tasks {meta['tasks']}), but this spec's is {spec.fingerprint()} (version "
            f"{spec.version}): load it with the spec it was trained with, or train a new model for this spec")
    config = ModelConfig.from_dict(meta["config"])
    model = build_model(spec, config, device="cpu")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        file_fp = (f.metadata() or {}).get("spec_fingerprint")
        if file_fp != str(meta["spec_fingerprint"]):
            raise CheckpointMismatch(f"{path.name} and {sidecar(path).name} disagree on the spec fingerprint "
                                     f"({file_fp} vs {meta['spec_fingerprint']}): they come from different saves")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    weights = {k: v for k, v in tensors.items() if not k.startswith(_OPT)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            "shape " + ", ".join(f"{k}: file {got[k]} vs model {expected[k]}" for k in wrong[:5]) if wrong else "",
        ) if s)
        raise CheckpointMismatch(f"{path.name} does not fit a {config.arch.value} model built from its own config "
                                 f"({detail}): the file was edited or written by other code; re-save it")
    model.load_state_dict(weights, strict=True)
    model.to(device if device is not None else default_device())
    optimizer_state = _optimizer_state(meta.get("optimizer"), tensors)
    return LoadedCheckpoint(model=model, config=config, meta=meta, optimizer_state=optimizer_state)


def _optimizer_state(optim_meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if not optim_meta:
        return None
    out: dict[str, Any] = {"steps": optim_meta["steps"], "samples": optim_meta["samples"]}
    for which, m in optim_meta.items():
        if which in _COUNTERS:
            continue
        state: dict[int, dict[str, Any]] = {int(pid): dict(m["scalars"].get(pid, {})) for pid in m["state_ids"]}
        prefix = f"{_OPT}.{which}."
        for key, val in tensors.items():
            if key.startswith(prefix):
                pid, name = key[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[name] = val
        out[which] = {"state": state, "param_groups": m["param_groups"]}
    return out
