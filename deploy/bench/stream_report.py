"""``bench stream`` output: the rates table, the Redis memory table, the notes and the profile tables."""

from __future__ import annotations

import math
from typing import Any


def _s(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    w = result["workload"]
    t = Table(title=f"zenith bench stream: {w['events']:,} events ({w['impressions']:,} impressions) pre-produced, "
                    f"{result['partitions']} partitions, window {result['window_s']:g}s, {result['cpus']} CPUs, "
                    f"{result['servers']}")
    cols = ["case", "events", "seconds", "events/s", "x raw client", "samples/s", "event->sample p50/p99 s",
            "close delay p50/p99 s", "Redis cmds/event (sent / incl. Lua)", "Redis server µs/event"]
    for c in cols:
        t.add_column(c, justify="left" if c == "case" else "right")
    for r in result["rows"]:
        rd = r.get("redis")
        e2s, cd = r.get("event_to_sample"), r.get("close_delay")
        name = f"[dim]{r['case']}[/]" if r["kind"] == "baseline" else r["case"]
        if r.get("events_per_s") is None:  # a reference that was skipped or failed
            t.add_row(name, f"{r['events']:,}", "-", "skipped" if "skipped" in r else "failed", "-", *["-"] * 5)
            continue
        t.add_row(name, f"{r['events']:,}", _s(r.get("wall_s"), ".1f"), f"{r['events_per_s']:,.0f}",
                  "-" if r["kind"] == "live" else f"{r['x_raw']:.4f}x", _s(r.get("samples_per_s"), ",.0f"),
                  f"{_s(e2s['p50_s'])} / {_s(e2s['p99_s'])}" if e2s else "-",
                  f"{_s(cd['p50_s'])} / {_s(cd['p99_s'])}" if cd else "-",
                  f"{rd['client_commands_per_event']:.2f} / {rd['all_commands_per_event']:.2f}" if rd else "-",
                  _s(rd["server_usec_per_event"], ".1f") if rd else "-")
    con = Console(width=220)
    con.print(t)
    for note in result.get("notes", []):
        con.print(f"note: {note}")
    refs = [r for r in result["rows"] if r["kind"] == "reference" and r.get("events_per_s") is not None]
    if refs:
        con.print("references: each its own subprocess and consumer group over the same backlog; rate from its first "
                  "event to its last backlog event (start-up excluded: "
                  + ", ".join(f"{r['case'].split(' (')[0].removeprefix('reference: ')} {r['startup_s']:.1f}s"
                              for r in refs) + ")")
    if "redis_memory" in result:
        print_memory(result["redis_memory"], con, "after the backlog")
    if "redis_memory_live" in result:
        print_memory(result["redis_memory_live"], con, "at the end of the live phase (last windows open)")
    app = next((r for r in result["rows"] if r["kind"] == "app" and r.get("events_per_s") is not None), None)
    if app:
        con.print(f"backlog: worker start-up {app['startup_s']:.1f}s excluded; rate from the first event processed to "
                  f"the last sample out; consuming alone ran at {app['events_per_s_consumed']:,.0f} events/s and "
                  f"{app['samples_when_consumed']:,} samples were out when the last event was in (the rest "
                  f"{app['last_sample_after_last_event_s']:.1f}s later). Pipelined Redis round trips per event "
                  f"{app['redis_round_trips_per_event']:.3f}; commands per event: "
                  + ", ".join(f"{k} {v}" for k, v in list(app["redis"]["by_command_per_event"].items())[:9]))
    live = next((r for r in result["rows"] if r["kind"] == "live"), None)
    if live:
        h, hc = live["histogram_event_to_sample"], live["histogram_close_delay"]
        con.print(f"live: delays exact from the {live['exact'].get('count', 0):,} sample records "
                  f"(emitted_ms - event_ms; close delay = that - window). The worker's own histograms say "
                  f"event->sample p50/p99 "
                  f"{_s(h['p50_s'])}/{_s(h['p99_s'])} s and close delay {_s(hc['p50_s'])}/{_s(hc['p99_s'])} s "
                  f"(bucket interpolation; the event->sample buckets are coarse around the window).")
    c = result.get("ceiling", {})
    if c.get("redis_bound_events_per_s"):
        con.print(f"ceiling: one worker {c['one_worker_events_per_s']:,.0f} events/s (CPU-bound in Python); the "
                  f"Redis server spends {c['redis_server_usec_per_event']:.0f} µs/event, so a single redis-server "
                  f"caps the stream near {c['redis_bound_events_per_s']:,.0f} events/s "
                  f"(~{c['workers_to_redis_bound']:.1f} workers' worth, partitions permitting: "
                  f"{c['partitions']} now)")
    if "profile" in result:
        op = result["profile"]
        print_profile(op, con, f"cProfile of the offline path (build_samples), {op['events']:,} events, "
                      f"{op['profiled_wall_s']:.1f}s under the profiler")
    if "worker_profile" in result:
        wp = result["worker_profile"]
        print_profile(wp, con, f"cProfile of the stream worker process, {wp['events']:,} events, "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in wp["left_out_s"].items() if v) + " left out")


def print_memory(m: dict[str, Any], con: Any, when: str = "") -> None:
    """Redis bytes per live user / room / author / pending impression / dedup key, and what bounds each."""
    from rich.table import Table

    if "error" in m:
        con.print(f"Redis memory {when}: not measured: {m['error']}")
        return
    t = Table(title=f"Redis memory {when}: {m['keys']:,} keys under {m['prefix']!r} (layout {m['layout']}), "
                    f"{m['bytes'] / 2**20:,.1f} MiB (MEMORY USAGE SAMPLES 0 on up to {m['sample_per_part']} keys "
                    f"per kind and part, scaled to the key count)")
    for c in ("per", "count", "keys", "bytes each", "total MiB", "keys by part (mean bytes)", "TTL seen s",
              "bounded by"):
        t.add_column(c, justify="right" if c in ("count", "keys", "bytes each", "total MiB") else "left")
    for d in m["kinds"].values():
        parts = ", ".join(f"{p} {v['keys']:,} ({v['mean_key_bytes']:,.0f})" for p, v in d["parts"].items())
        lo = [v["ttl_s_min"] for v in d["parts"].values() if v["ttl_s_min"] is not None]
        hi = [v["ttl_s_max"] for v in d["parts"].values() if v["ttl_s_max"] is not None]
        no_ttl = sum(v["keys_without_ttl"] for v in d["parts"].values())
        ttl = (f"{min(lo):,.0f}-{max(hi):,.0f}" if lo else "-") + (f" ({no_ttl:,} sampled without)" if no_ttl else "")
        t.add_row(d["unit"], f"{d['entities']:,}", f"{d['keys']:,}", _s(d["bytes_per_entity"], ",.0f"),
                  f"{d['bytes'] / 2**20:,.2f}", parts, ttl, d["bound"])
    con.print(t)
    dd = m["dedup"]
    ent = dd.get("entity_pos_fields_estimated") or {}
    con.print(f"dedup keys: {dd['keys']:,} ({dd['event_keys']:,} per-event ev:* markers, {dd['pos_keys']:,} position "
              f"hashes with {dd['pos_fields']:,} fields), {dd['bytes'] / 2**20:,.2f} MiB"
              + ("; pos: fields inside entity hashes (estimated from the sample): "
                 + ", ".join(f"{k} {v:,}" for k, v in ent.items()) if any(ent.values()) else ""))
    join = m["kinds"].get("pending", {}).get("join")
    if m["pending_impressions"] is None:
        con.print("pending impressions: not in Redis (the join state is elsewhere in this layout)")
    elif join:
        it, sh = join["items"], join["encoded_share"]
        con.print(f"join state: {join['users']:,} users, {it['p']:,} pending impressions ({sh['p']:.0%} of the encoded "
                  f"bytes), {it['c']:,} closed impressions ({sh['c']:.0%}), {it['h']:,} held engagements "
                  f"({sh['h']:.0%}), {it['s']:,} seen ids ({sh['s']:.0%}); bytes per pending impression = the "
                  f"join hashes' bytes x the pending share / pending impressions")


def print_profile(p: dict, con: Any, what: str) -> None:
    from rich.table import Table

    t = Table(title=f"where the stream's time goes: {what} (self time; library/builtin time charged to the project "
                    f"code that called it)")
    for c in ("group", "share", "seconds", "part", "part share", "what"):
        t.add_column(c, justify="left" if c in ("group", "part", "what") else "right")
    for g in p["groups"]:
        parts = [o for o in p["owners"] if o["group"] == g["group"]]
        for i, o in enumerate(parts):
            t.add_row(g["group"] if i == 0 else "", f"{g['share']:.0%}" if i == 0 else "",
                      f"{g['seconds']:.2f}" if i == 0 else "", o["owner"], f"{o['share']:.0%}", o["what"])
    con.print(t)
    top = Table(title="top cumulative entries")
    for c in ("function", "cumulative s", "self s", "calls"):
        top.add_column(c, justify="left" if c == "function" else "right")
    for e in p["top_cumulative"][:12]:
        top.add_row(e["function"], f"{e['cumulative_s']:.2f}", f"{e['self_s']:.2f}", f"{e['calls']:,}")
    con.print(top)
