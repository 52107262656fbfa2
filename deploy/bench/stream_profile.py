"""``bench stream --profile``: cProfile self time attributed to groups (Redis round trips, Lua/state writes,
feature assembly, join, (de)serialization); time in builtins and libraries is charged to the project function
that called them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GROUPS = {
    "redis wait": "Redis round trips", "redis client": "Redis round trips",
    "state writes": "Lua/state writes", "state reads": "feature assembly", "features": "feature assembly",
    "join": "join", "decode events": "(de)serialization", "encode samples": "(de)serialization",
    "join state codec": "(de)serialization", "asyncio": "other", "metrics": "other", "driver": "other",
    "faust": "Faust + Kafka client", "kafka client": "Faust + Kafka client",
}
NOT_WORK = {"startup (imports)"}  # reported, left out of the shares
OWNER_HELP = {
    "redis wait": "event loop blocked on Redis replies (network + server-side Lua and reads)",
    "redis client": "redis-py: pack pipelined commands, parse replies (incl. its per-reply asyncio timeouts)",
    "state writes": "state_write / LiveState.record_*: build each event's Lua arguments (orjson)",
    "state reads": "LiveState.read: as-of subtraction of later increments, history parsing",
    "features": "stream.features.assemble: hashing ids, dense features",
    "join": "label join: pending impressions, held engagements, due/close",
    "decode events": "decode_event: JSON -> validated typed event",
    "encode samples": "SampleCodec.encode: feature row -> binary sample record",
    "join state codec": "UserJoinState encode/decode (the join state's Redis format)",
    "asyncio": "asyncio event loop (scheduling callbacks)", "metrics": "prometheus_client counters and histograms",
    "driver": "offline driver loop",
    "faust": "Faust/mode runtime hosting the batch loop (start-up, services, timers)",
    "kafka client": "Kafka clients: aiokafka (Faust's) and confluent-kafka calls on the loop's thread",
}


def owner(func: tuple[str, int, str]) -> str | None:
    file, _, name = func
    f = file.replace("\\", "/")
    if name == "<method 'poll' of 'select.epoll' objects>" or name.startswith("<method 'select' of"):
        return "redis wait"
    if "importlib" in f or name in ("<built-in method builtins.exec>", "<built-in method marshal.loads>",
                                    "<built-in method _imp.create_dynamic>"):
        return "startup (imports)"
    if "/faust/" in f or "/mode/" in f:
        return "faust"
    if "/aiokafka/" in f or "/kafka/" in f:
        return "kafka client"
    if "/redis/" in f:
        return "redis client"
    if "/asyncio/" in f:
        # The loop itself is overhead of its own; timeouts, futures and streams are charged to their users.
        return "asyncio" if f.rsplit("/", 1)[-1] in ("base_events.py", "events.py", "runners.py") else None
    if "/prometheus_client/" in f:
        return "metrics"
    if f.endswith("stream/events.py"):
        return "decode events"
    if f.endswith("stream/samples.py"):
        return "offline-only" if name == "decode" else "encode samples"
    if f.endswith("stream/join.py"):
        return "join state codec" if name in ("encode", "decode") else "join"
    if f.endswith("stream/features.py"):
        return "features"
    if f.endswith("state/store.py"):
        return "state reads" if name in ("read", "read_items", "_fill_categories", "_as_of",
                                         "_history_item") else "state writes"
    if f.endswith("stream/processor.py"):
        if name in ("state_write", "apply_state"):
            return "state writes"
        if name == "build_samples":
            return "features"
        if name == "observe_emitted":
            return "metrics"
        return "join"
    if f.endswith("stream/offline.py") or f.endswith("deploy/bench/stream_baselines.py"):
        return "driver"
    return None  # builtins, numpy, stdlib: charged to whoever called them


def profile_breakdown(prof: Any, wall_s: float, worker: bool = False, top: int = 18) -> dict:
    """Self time per owner (see ``owner``); time in builtins and libraries without an owner is charged to
    their callers in proportion to the calls' self time, recursively. In the worker the epoll wait is idle
    time as well as I/O, and start-up imports are not stream work: both are reported but left out of the shares."""
    import pstats

    stats = pstats.Stats(prof).stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    memo: dict[tuple, dict[str, float]] = {}

    def owners_of(func: tuple, visiting: frozenset = frozenset()) -> dict[str, float]:
        """Fractions of ``func``'s self time per owner: its own, or its callers' mix (memoized; cycles and
        callers outside the profile count as unattributed)."""
        own = owner(func)
        if own is not None:
            return {own: 1.0}
        if func in memo:
            return memo[func]
        callers = stats[func][4] if func in stats else {}
        total = sum(v[2] for v in callers.values())
        if func in visiting or total <= 0:
            return {"unattributed": 1.0}
        mix: dict[str, float] = {}
        for caller, v in callers.items():
            for k, f in owners_of(caller, visiting | {func}).items():
                mix[k] = mix.get(k, 0.0) + f * v[2] / total
        memo[func] = mix
        return mix

    owner_time: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if tt > 0:
            for k, f in owners_of(func).items():
                owner_time[k] = owner_time.get(k, 0.0) + tt * f
    left_out = {"offline result decode (not stream work)": owner_time.pop("offline-only", 0.0)}
    for k in NOT_WORK | ({"redis wait"} if worker else set()):
        left_out["idle + I/O wait (epoll)" if k == "redis wait" else k] = owner_time.pop(k, 0.0)
    total = sum(owner_time.values())
    owners = [{"owner": k, "group": GROUPS.get(k, "other"), "seconds": v, "share": v / total,
               "what": OWNER_HELP.get(k, "")} for k, v in sorted(owner_time.items(), key=lambda kv: -kv[1])]
    groups: dict[str, float] = {}
    for o in owners:
        groups[o["group"]] = groups.get(o["group"], 0.0) + o["seconds"]
    boring = ("/asyncio/", "runners.py", "importlib", "cProfile", "/mode/utils/", "/typer/", "/click/")
    cum = sorted(((ct, tt, nc, f) for f, (_cc, nc, tt, ct, _) in stats.items()), key=lambda x: -x[0])
    top_cum = [{"function": f"{'/'.join(Path(f[0]).parts[-2:])}:{f[1]}({f[2]})", "cumulative_s": ct, "self_s": tt,
                "calls": nc}
               for ct, tt, nc, f in cum
               if f[0] != "~" and not any(b in f[0] for b in boring) and "<module>" not in f[2]][:top]
    return {"profiled_wall_s": wall_s, "attributed_s": total, "left_out_s": left_out,
            "groups": [{"group": g, "seconds": s, "share": s / total}
                       for g, s in sorted(groups.items(), key=lambda kv: -kv[1])],
            "owners": owners, "top_cumulative": top_cum}
