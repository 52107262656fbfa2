"""``ModelConfig``: every knob of a ranker in one typed, JSON-round-trippable dataclass, plus named presets.

A config is validated against a :class:`~model.spec.FeatureSpec` (the token count ``T`` comes from the
spec), and a bad combination fails with a message saying what to change:

>>> from model.spec import default_live_spec
>>> spec = default_live_spec()                       # T = 12 tokens
>>> ModelConfig(arch=Arch.ZENITH, d_model=64, rsa_k=20).validate(spec)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: RSA retokenization needs T*k % d_model == 0 (T=12, k=20, d_model=64): ... e.g. rsa_k=16, 32, 64, 128
>>> cfg = preset(Arch.ZENITH, Size.S, spec)
>>> ModelConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from model.embedding import EmbeddingKind, SparseOptim
from model.spec import FeatureSpec

_PAIR_FIELDS = ("emb_bucket_overrides", "wide_crosses")  # tuples of pairs: JSON lists of lists


class Arch(StrEnum):
    DLRM = "dlrm"
    DCNV2 = "dcnv2"
    RANKMIXER = "rankmixer"
    TRANSFORMER = "transformer"
    ZENITH = "zenith"  # RSA fusion + TSwiGLU boost
    ZENITH_PP = "zenith++"  # TMHSA fusion + TSMoE (or TSwiGLU) boost


class Size(StrEnum):
    S = "S"
    M = "M"
    L = "L"
    CUSTOM = "custom"


class Boost(StrEnum):
    TSWIGLU = "tswiglu"
    TSMOE = "tsmoe"


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = Arch.ZENITH
    size: Size = Size.CUSTOM
    # --- token bodies (Zenith, Zenith++, RankMixer, Transformer) -------------------------------------
    d_model: int = 64  # D, the token width everywhere after the tokenizer
    n_layers: int = 2
    n_heads: int = 4  # TMHSA / Transformer heads
    ffn_mult: int = 2  # hidden width of (T)SwiGLU / per-token FFNs = ffn_mult * d_model
    rsa_k: int | None = None  # RSA output width per token; None -> d_model // 2 (retokenize every layer)
    boost: Boost | None = None  # None -> TSwiGLU for Zenith, TSMoE for Zenith++
    n_experts: int = 4
    top_k: int = 2
    moe_aux_weight: float = 0.01
    # --- vector bodies (DLRM, DCNv2) -------------------------------------------------------------------
    mlp_hidden: tuple[int, ...] = (256, 128)
    cross_layers: int = 2
    cross_rank: int | None = None  # None -> full-rank DCNv2 cross layers
    # --- heads -----------------------------------------------------------------------------------------
    head_hidden: int = 32
    # --- inputs and the wide path (see model.dense, model.wide) ---------------------------------------
    dense_norm: bool = True  # rates as logits + running standardisation of the dense features
    wide: bool = True  # a logistic regression over ids, id crosses and dense features beside the deep body
    wide_buckets: int = 1 << 18
    wide_crosses: tuple[tuple[str, str], ...] | None = None  # None -> model.wide.default_crosses(spec)
    wide_lr: float = 0.1  # row-wise Adagrad, per-coordinate like FTRL
    # FTRL's beta: a coordinate's step is wide_lr * g / (wide_beta + sqrt(sum of g^2)) on the gradient of the
    # batch's *summed* loss, so a key seen once moves less than one seen in many rows of a batch.
    wide_beta: float = 1.0
    wide_dense_lr: float = 0.1  # the wide path's dense weights and bias: few, seen in every row
    # --- embeddings ------------------------------------------------------------------------------------
    emb_kind: EmbeddingKind = EmbeddingKind.HASHED
    emb_dim: int = 16
    emb_buckets: int = 1 << 15
    emb_hashes: int = 2
    emb_bucket_overrides: tuple[tuple[str, int], ...] = ()  # (table name, buckets) pairs
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = 1e-3  # dense AdamW
    weight_decay: float = 0.0
    emb_lr: float = 0.05  # sparse optimizer
    sparse_optim: SparseOptim = SparseOptim.ROWWISE_ADAGRAD
    grad_clip: float = 5.0
    seed: int = 0
    bf16_autocast: bool = False  # CUDA only; ignored on CPU
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes, saved with the model

    # ---- derived ---------------------------------------------------------------------------------------
    @property
    def boost_kind(self) -> Boost:
        if self.boost is not None:
            return self.boost
        return Boost.TSMOE if self.arch is Arch.ZENITH_PP else Boost.TSWIGLU

    @property
    def k(self) -> int:
        return self.rsa_k if self.rsa_k is not None else max(self.d_model // 2, 1)

    def rsa_schedule(self, n_tokens: int) -> list[tuple[int, int, int]]:
        """Per RSA layer ``(T_in, k, T_out)`` with ``d = d_model``: layers alternate ``k`` and ``D²/k``, so
        the token count goes ``T -> T·k/D -> T -> ...`` and every layer's reshape cuts tokens into fragments
        that land in other tokens (``k == D`` keeps T and does no retokenization)."""
        d, out, t = self.d_model, [], n_tokens
        for layer in range(self.n_layers):
            k = self.k if layer % 2 == 0 else d * d // self.k
            out.append((t, k, t * k // d))
            t = t * k // d
        return out

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self, spec: FeatureSpec) -> ModelConfig:
        """Raise ``ValueError`` naming the field to change; return self so calls can chain."""
        t, d = spec.n_tokens(), self.d_model

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(d > 0 and self.n_layers >= 1, f"d_model and n_layers must be positive (got {d}, {self.n_layers})")
        need(self.emb_dim > 0 and self.emb_buckets >= 2 and 1 <= self.emb_hashes <= 8,
             "emb_dim > 0, emb_buckets >= 2 and emb_hashes in 1..8 are required")
        need(self.head_hidden > 0 and self.ffn_mult > 0, "head_hidden and ffn_mult must be positive")
        need(not self.wide or (self.wide_buckets >= 2 and self.wide_lr > 0),
             f"the wide path needs wide_buckets >= 2 and wide_lr > 0 (got {self.wide_buckets}, {self.wide_lr}); "
             "or set wide=False")
        ids = {f.name for f in spec.ids}
        need(all(a in ids and b in ids for a, b in self.wide_crosses or ()),
             f"wide_crosses must pair id features of the spec {sorted(ids)}, got {self.wide_crosses}")
        if self.arch is Arch.ZENITH:
            k = self.k
            good = [c for c in range(1, 2 * d + 1) if (t * c) % d == 0 and (self.n_layers < 2 or (d * d) % c == 0)]
            good = sorted(good, key=lambda c: (abs(c - k), c))[:4]
            hint = ", ".join(str(c) for c in sorted(good))
            need(k >= 1, f"rsa_k must be >= 1, got {k}")
            need((t * k) % d == 0,
                 f"RSA retokenization needs T*k % d_model == 0 (T={t}, k={k}, d_model={d}): "
                 f"choose rsa_k so that T*k % d_model == 0, e.g. rsa_k={hint}")
            need(self.n_layers < 2 or (d * d) % k == 0,
                 f"stacked RSA layers alternate k and d_model²/k, so d_model² must be divisible by k "
                 f"(d_model={d}, k={k}): choose rsa_k from e.g. {hint}")
        if self.arch in (Arch.ZENITH_PP, Arch.TRANSFORMER):
            need(d % self.n_heads == 0,
                 f"d_model={d} must be divisible by n_heads={self.n_heads}: choose n_heads from "
                 f"{[h for h in range(1, 17) if d % h == 0]}")
        if self.arch is Arch.RANKMIXER:
            need(d % t == 0,
                 f"RankMixer's token mixing splits each token into T={t} chunks: choose d_model divisible by {t}, "
                 f"e.g. d_model={max(t, (d // t) * t)} or {(d // t + 1) * t}")
        if self.arch in (Arch.ZENITH, Arch.ZENITH_PP) and self.boost_kind is Boost.TSMOE:
            need(self.n_experts >= 2, f"TSMoE needs n_experts >= 2 (got {self.n_experts}); or use boost=tswiglu")
            need(1 <= self.top_k <= self.n_experts,
                 f"top_k must be in 1..n_experts={self.n_experts} (got {self.top_k})")
        if self.arch is Arch.DCNV2:
            need(self.cross_layers >= 1, f"DCNv2 needs cross_layers >= 1 (got {self.cross_layers})")
            need(self.cross_rank is None or self.cross_rank >= 1, "cross_rank must be None (full rank) or >= 1")
        if self.arch in (Arch.DLRM, Arch.DCNV2):
            need(len(self.mlp_hidden) >= 1 and all(h > 0 for h in self.mlp_hidden),
                 f"mlp_hidden must list positive widths, got {self.mlp_hidden}")
        return self

    # ---- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else [list(p) for p in v] if f.name in _PAIR_FIELDS \
                and v is not None else list(v) if isinstance(v, tuple) else v
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(d) - known
        assert not unknown, f"unknown ModelConfig fields {sorted(unknown)}; remove them or upgrade the code"
        kw = dict(d)
        enums = {"arch": Arch, "size": Size, "boost": Boost, "emb_kind": EmbeddingKind, "sparse_optim": SparseOptim}
        for name, cls in enums.items():
            if kw.get(name) is not None:
                kw[name] = cls(kw[name])
        if "mlp_hidden" in kw:
            kw["mlp_hidden"] = tuple(kw["mlp_hidden"])
        if "emb_bucket_overrides" in kw:
            kw["emb_bucket_overrides"] = tuple((str(n), int(b)) for n, b in kw["emb_bucket_overrides"])
        if kw.get("wide_crosses") is not None:
            kw["wide_crosses"] = tuple((str(a), str(b)) for a, b in kw["wide_crosses"])
        return ModelConfig(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Presets: sizes are chosen so that, on the default live spec (T = 12), each arch's S/M/L has roughly the
# same dense parameter count (~0.3M / ~1M / ~3M) -- the scaling comparison is at matched params.
_PRESETS: dict[Arch, dict[Size, dict[str, Any]]] = {
    Arch.DLRM: {
        Size.S: dict(d_model=32, mlp_hidden=(384, 192)),
        Size.M: dict(d_model=48, mlp_hidden=(896, 384)),
        Size.L: dict(d_model=64, mlp_hidden=(1792, 768, 256)),
    },
    Arch.DCNV2: {
        Size.S: dict(d_model=32, cross_layers=2, cross_rank=64, mlp_hidden=(256, 128)),
        Size.M: dict(d_model=48, cross_layers=3, cross_rank=128, mlp_hidden=(512, 256)),
        Size.L: dict(d_model=64, cross_layers=3, cross_rank=None, mlp_hidden=(1024, 512)),
    },
    Arch.RANKMIXER: {
        Size.S: dict(d_model=48, n_layers=2, ffn_mult=2),
        Size.M: dict(d_model=96, n_layers=2, ffn_mult=2),
        Size.L: dict(d_model=132, n_layers=3, ffn_mult=2),
    },
    Arch.TRANSFORMER: {  # shared weights: fewer params for the same width, more FLOPs per param
        Size.S: dict(d_model=64, n_layers=2, n_heads=4, ffn_mult=2),
        Size.M: dict(d_model=128, n_layers=2, n_heads=4, ffn_mult=2),
        Size.L: dict(d_model=192, n_layers=3, n_heads=6, ffn_mult=2),
    },
    Arch.ZENITH: {
        Size.S: dict(d_model=40, n_layers=2, ffn_mult=2),
        Size.M: dict(d_model=80, n_layers=2, ffn_mult=2),
        Size.L: dict(d_model=128, n_layers=3, ffn_mult=2),
    },
    Arch.ZENITH_PP: {
        Size.S: dict(d_model=24, n_layers=2, n_heads=4, n_experts=4, top_k=2, ffn_mult=1),
        Size.M: dict(d_model=48, n_layers=2, n_heads=4, n_experts=4, top_k=2, ffn_mult=1),
        Size.L: dict(d_model=72, n_layers=3, n_heads=4, n_experts=4, top_k=2, ffn_mult=1),
    },
}


# Wider models take smaller Adam steps (the same rule for every arch); on short streams a 3x larger model at
# the small model's lr learned measurably slower.
_SIZE_LR = {Size.S: 1e-3, Size.M: 7e-4, Size.L: 5e-4}


def preset(arch: Arch | str, size: Size | str, spec: FeatureSpec | None = None, **overrides: Any) -> ModelConfig:
    """The named ``arch``/``size`` config, with ``overrides`` applied; validated against ``spec`` if given.

    For a spec with another token count, ``d_model`` of RankMixer is rounded up to a multiple of T and an
    invalid default ``rsa_k`` falls back to the nearest valid one, so presets work on any spec.
    """
    arch, size = Arch(arch), Size(size)
    assert size is not Size.CUSTOM, "preset sizes are S, M and L; build a ModelConfig directly for custom"
    kw: dict[str, Any] = {"lr": _SIZE_LR[size], **_PRESETS[arch][size]}
    kw.update(overrides)
    cfg = ModelConfig(arch=arch, size=size, **kw)
    if spec is None:
        return cfg
    t = spec.n_tokens()
    if arch is Arch.RANKMIXER and "d_model" not in overrides and cfg.d_model % t:
        cfg = cfg.replace(d_model=(cfg.d_model // t + 1) * t)
    if arch is Arch.ZENITH and "rsa_k" not in overrides:
        d = cfg.d_model
        ok = [c for c in range(1, d + 1) if (t * c) % d == 0 and (d * d) % c == 0]
        cfg = cfg.replace(rsa_k=min(ok, key=lambda c: (abs(c - d // 2), -c)))
    return cfg.validate(spec)
