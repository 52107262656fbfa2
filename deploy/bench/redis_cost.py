"""What the stream costs Redis: server time and commands per event (INFO commandstats deltas), and memory per
live user, room, author and pending impression (SCAN + MEMORY USAGE), with what bounds each."""

from __future__ import annotations

import math
import random
import re
from typing import Any

CLIENT_NOISE = {"info", "hello", "ping", "client|setinfo", "client|setname", "select", "script|load", "command",
                "command|docs"}

# ---- key schema: the one table to change when the layout changes ------------------------------------------------
# (regex on the key without the prefix, kind, part); first match wins; the "id" group names the entity.
# New layout: Redis Cluster hash tags ({u:..}, {r:..}, {a:..}, {jp:<partition>}) and dedup by position.
# Old layout: u:<user>, r:<room>, a:<author> and one ev:<event id> dedup marker per event.
KEY_SCHEMA: list[tuple[str, str, str]] = [
    (r"\{u:(?P<id>[^}]*)\}", "user", "hash"),
    (r"\{u:(?P<id>[^}]*)\}:log", "user", "log"),
    (r"\{u:(?P<id>[^}]*)\}:seq", "user", "seq"),
    (r"\{r:(?P<id>[^}]*)\}", "room", "hash"),
    (r"\{r:(?P<id>[^}]*)\}:log", "room", "log"),
    (r"\{a:(?P<id>[^}]*)\}", "author", "hash"),
    (r"\{a:(?P<id>[^}]*)\}:log", "author", "log"),
    (r"pos", "dedup", "pos"),
    (r"\{jp:(?P<id>[^}]*)\}:join", "pending", "join"),
    (r"\{jp:(?P<id>[^}]*)\}:pos", "dedup", "pos"),
    (r"\{jp:(?P<id>[^}]*)\}:meta", "dedup", "pos"),  # epoch + pos:<topic>/<partition> of the join
    # old layout
    (r"ev:(?P<id>.*)", "dedup", "ev"),
    (r"u:(?P<id>.*):log", "user", "log"),
    (r"u:(?P<id>.*):seq", "user", "seq"),
    (r"u:(?P<id>.*)", "user", "hash"),
    (r"r:(?P<id>.*):log", "room", "log"),
    (r"r:(?P<id>.*)", "room", "hash"),
    (r"a:(?P<id>.*):log", "author", "log"),
    (r"a:(?P<id>.*)", "author", "hash"),
]
_COMPILED = [(re.compile(p), kind, part) for p, kind, part in KEY_SCHEMA]
UNIT = {"user": "live user", "room": "room", "author": "author", "pending": "pending impression",
        "dedup": "dedup key", "other": "key"}
KIND_ORDER = ("user", "room", "author", "pending", "dedup", "other")


def classify(key: str, prefix: str) -> tuple[str, str, str]:
    """(kind, part, entity id) of one key; ("other", "unknown", key) for keys the table does not know.

    >>> classify("zl:{u:42}:seq", "zl:"), classify("zl:ev:e1", "zl:"), classify("zl:x", "zl:")
    (('user', 'seq', '42'), ('dedup', 'ev', 'e1'), ('other', 'unknown', 'x'))
    """
    if not key.startswith(prefix):
        return "other", "unknown", key
    rest = key[len(prefix):]
    for rx, kind, part in _COMPILED:
        m = rx.fullmatch(rest)
        if m:
            return kind, part, m.groupdict().get("id") or rest
    return "other", "unknown", rest


def bounds(cfg: Any = None) -> dict[str, str]:
    """What keeps each kind of state bounded, from ``state.store.StateConfig`` (fields read defensively: the
    config is being reshaped)."""
    if cfg is None:
        from state.store import StateConfig

        cfg = StateConfig()

    def dur(name: str, scale: float = 1.0) -> str:
        s = getattr(cfg, name, None)
        if s is None:
            return f"{name}=?"
        s = float(s) * scale
        return f"{name}=" + (f"{s / 86400:g} d" if s >= 86400 else f"{s / 3600:g} h" if s >= 3600 else f"{s:g} s")

    logs = f"logs keep {dur('asof_keep_ms', 1e-3)} of increments"
    return {
        "user": f"{dur('user_ttl_s')} after the last event; seq capped at "
                f"history_cap={getattr(cfg, 'history_cap', '?')}; {logs}",
        "room": f"{dur('room_ttl_s')} while live (room events refresh it), {dur('ended_room_ttl_s')} after the end; "
                f"{logs}",
        "author": f"{dur('author_ttl_s')} after the last event; {logs}",
        "pending": "window + lateness: dropped once its sample is acknowledged (the join hash also keeps closed "
                   "impressions, held engagements and seen ids for a bounded time)",
        "dedup": ("ev:* one per event for " + (dur("dedup_ttl_s") if hasattr(cfg, "dedup_ttl_s") else "its TTL")
                  + " (grows with the event rate); pos/meta: one field per topic-partition (O(partitions)), "
                    "plus pos: fields inside entity hashes, expiring with them"),
        "other": "not in the bench's key table (deploy/bench/redis_cost.py KEY_SCHEMA)",
    }


def _escape_glob(s: str) -> str:
    return re.sub(r"([\[\]*?\\])", r"\\\1", s)


def redis_memory(redis_url: str, prefix: str = "zl:", sample: int = 500, seed: int = 0,
                 cfg: Any = None) -> dict[str, Any]:
    """Redis bytes per live user, room, author, pending impression and dedup key under ``prefix``.

    SCAN lists every key; ``MEMORY USAGE key SAMPLES 0`` (exact for that key) runs on up to ``sample`` keys of
    each (kind, part), and a part's bytes are its sampled mean times its key count. A user's (room's, author's)
    bytes are the sum over its keys (hash, log, seq) divided by the number of distinct ids. Pending impressions
    are counted from the join hashes (``sum(len(obj["p"]))`` over their fields, read whole); the join hashes'
    bytes are split between pending impressions, closed impressions, held engagements and seen ids in
    proportion to their encoded lengths, and a pending impression's bytes are its share over their number.
    Position fields (``pos:*``) inside the sampled entity hashes are counted too. The TTLs seen on the sampled
    keys are reported beside the configured bounds.
    """
    import orjson
    import redis

    rng = random.Random(seed)
    r = redis.Redis.from_url(redis_url)
    try:
        keys: dict[tuple[str, str], list[bytes]] = {}
        ids: dict[str, set[str]] = {}
        for k in r.scan_iter(match=_escape_glob(prefix) + "*", count=2000):
            kind, part, ident = classify(k.decode(errors="replace"), prefix)
            keys.setdefault((kind, part), []).append(k)
            ids.setdefault(kind, set()).add(ident)
        layouts = {"new" if b"{" in v[0] or part == "pos" else "old"
                   for (kind, part), v in keys.items() if kind != "other"}
        out: dict[str, Any] = {"prefix": prefix, "keys": sum(len(v) for v in keys.values()),
                               "layout": "+".join(sorted(layouts)) or "empty", "sample_per_part": sample,
                               "kinds": {}}
        why = bounds(cfg)
        for (kind, part), ks in sorted(keys.items(), key=lambda kv: (KIND_ORDER.index(kv[0][0]), kv[0][1])):
            picked = ks if len(ks) <= sample else rng.sample(ks, sample)
            pipe = r.pipeline(transaction=False)
            for k in picked:
                pipe.memory_usage(k, samples=0)
                pipe.pttl(k)
            res = pipe.execute()
            sizes = [x or 0 for x in res[0::2]]
            ttls = [t / 1000 for t in res[1::2] if isinstance(t, int) and t >= 0]
            mean = sum(sizes) / len(sizes) if sizes else 0.0
            d = out["kinds"].setdefault(kind, {"unit": UNIT[kind], "keys": 0, "bytes": 0.0, "bound": why[kind],
                                               "parts": {}})
            d["keys"] += len(ks)
            d["bytes"] += mean * len(ks)
            d["parts"][part] = {"keys": len(ks), "sampled": len(picked), "bytes": mean * len(ks),
                                "mean_key_bytes": mean, "keys_without_ttl": sum(1 for t in res[1::2] if t == -1),
                                "ttl_s_min": min(ttls) if ttls else None, "ttl_s_max": max(ttls) if ttls else None}
        pending = None
        join: dict[str, Any] = {}
        if ("pending", "join") in keys:
            pending, users, enc = 0, 0, {"p": 0, "c": 0, "h": 0, "s": 0}
            items = dict.fromkeys(enc, 0)
            for k in keys[("pending", "join")]:
                for v in r.hgetall(k).values():
                    try:
                        obj = orjson.loads(v)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(obj, dict):
                        continue
                    users += 1
                    for part in enc:
                        x = obj.get(part) or []
                        items[part] += len(x)
                        enc[part] += len(orjson.dumps(x))
            pending = items["p"]
            total_enc = sum(enc.values()) or 1
            join = {"users": users, "items": items, "encoded_share": {k: v / total_enc for k, v in enc.items()}}
        pos_fields = sum(r.hlen(k) for k in keys.get(("dedup", "pos"), []))
        entity_pos: dict[str, float] = {}
        for kind in ("user", "room", "author"):
            ks = keys.get((kind, "hash"), [])
            picked = ks if len(ks) <= sample else rng.sample(ks, sample)
            if picked:
                pipe = r.pipeline(transaction=False)
                for k in picked:
                    pipe.hkeys(k)
                n = sum(sum(1 for f in fs if f.startswith(b"pos:")) for fs in pipe.execute())
                entity_pos[kind] = n / len(picked) * len(ks)
    finally:
        r.close()
    for kind, d in out["kinds"].items():
        n = (pending or 0) if kind == "pending" else d["keys"] if kind in ("dedup", "other") else len(ids[kind])
        d["entities"] = n
        bytes_ = d["bytes"] * join["encoded_share"]["p"] if kind == "pending" and join else d["bytes"]
        d["bytes_per_entity"] = bytes_ / n if n else math.nan
    if join:
        out["kinds"]["pending"]["join"] = join
    dedup = out["kinds"].get("dedup", {})
    out["pending_impressions"] = pending  # None: the join state is not in Redis (old layout: Faust's table)
    out["dedup"] = {"keys": dedup.get("keys", 0), "bytes": dedup.get("bytes", 0.0),
                    "event_keys": dedup.get("parts", {}).get("ev", {}).get("keys", 0),
                    "pos_keys": dedup.get("parts", {}).get("pos", {}).get("keys", 0), "pos_fields": pos_fields,
                    "entity_pos_fields_estimated": {k: round(v) for k, v in entity_pos.items()}}
    out["bytes"] = sum(d["bytes"] for d in out["kinds"].values())
    return out


def lua_inner_commands() -> set[str]:
    """Commands the state scripts run inside EVALSHA/FCALL (their time is already inside the script's)."""
    from importlib import resources

    lua_dir = resources.files("state").joinpath("lua")
    lua = "\n".join(f.read_text() for f in lua_dir.iterdir() if f.name.endswith(".lua")) if lua_dir.is_dir() else ""
    return {m.lower() for m in re.findall(r"redis\.p?call\(\s*['\"](\w+)['\"]", lua)}


def commandstats(redis_url: str) -> dict[str, tuple[int, int]]:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in r.info("commandstats").items()}
    finally:
        r.close()


def redis_delta(before: dict, after: dict, events: int) -> dict:
    inner = lua_inner_commands()
    delta = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1]) for k, (c, u) in after.items()}
    delta = {k: v for k, v in delta.items() if v[0] > 0 and k not in CLIENT_NOISE}
    sent = {k: v for k, v in delta.items() if k not in inner}
    per = max(events, 1)
    return {
        "client_commands_per_event": sum(c for c, _ in sent.values()) / per,
        "all_commands_per_event": sum(c for c, _ in delta.values()) / per,  # incl. those inside Lua
        "server_usec_per_event": sum(u for _, u in sent.values()) / per,  # EVALSHA's usec includes its calls
        "by_command_per_event": {k: round(c / per, 3) for k, (c, _) in sorted(delta.items(), key=lambda kv: -kv[1][0])},
        "lua_inner": sorted(inner),
    }
