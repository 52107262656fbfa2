"""Reference app for ``bench stream``: a Quix Streams app doing the stream's stateful work in its own way.

``python -m deploy.bench.quix_app --bootstrap HOST:PORT --group ID --state-dir DIR --progress FILE
--impression T --engagement T --live T --out T``

JSON decode of every event; per-user state in Quix's RocksDB stores (with their changelog topics): on an
impression the user's impression count and recent rooms (last ``RECENT``), on an engagement the user's
counters per engagement kind and recently entered rooms; one output record per impression (the user's
counters at that moment) to ``--out``; live events decoded and counted. At-least-once, Quix's defaults
otherwise. Quix keeps a state store per input topic, so impression and engagement state are two stores keyed
by the same user id. Runs until SIGTERM. Plaintext Kafka only (the bench's own broker).
"""

from __future__ import annotations

import argparse
from typing import Any

from deploy.bench.progress import Progress

RECENT = 20


def main() -> None:
    from quixstreams import Application, State

    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--progress", required=True)
    for t in ("impression", "engagement", "live", "out"):
        ap.add_argument(f"--{t}", required=True)
    a = ap.parse_args()

    app = Application(broker_address=a.bootstrap, consumer_group=a.group, auto_offset_reset="earliest",
                      state_dir=a.state_dir, processing_guarantee="at-least-once", loglevel="WARNING")
    progress = Progress(a.progress)

    def on_impression(ev: dict[str, Any], state: State) -> dict[str, Any]:
        progress.add()
        n = state.get("impressions", 0) + 1
        rooms = state.get("recent_rooms", [])
        rooms.append(ev["room_id"])
        del rooms[:-RECENT]
        state.set("impressions", n)
        state.set("recent_rooms", rooms)
        return {"impression_id": ev["event_id"], "user_id": ev["user_id"], "room_id": ev["room_id"],
                "author_id": ev["author_id"], "ts_ms": ev["ts_ms"], "user_impressions": n,
                "recent_rooms": rooms[-5:], "seen_room_before": ev["room_id"] in rooms[:-1]}

    def on_engagement(ev: dict[str, Any], state: State) -> None:
        progress.add()
        kind = ev["kind"]
        counts = state.get("counts", {})
        counts[kind] = counts.get(kind, 0) + 1
        state.set("counts", counts)
        if kind == "watch":
            state.set("watch_s", state.get("watch_s", 0.0) + float(ev.get("watch_seconds") or 0.0))
        if kind == "enter":
            rooms = state.get("entered_rooms", [])
            rooms.append(ev["room_id"])
            del rooms[:-RECENT]
            state.set("entered_rooms", rooms)

    def on_live(ev: dict[str, Any]) -> None:
        progress.add()

    out = app.topic(a.out, value_serializer="json", key_serializer="str")
    imp = app.dataframe(app.topic(a.impression, value_deserializer="json", key_deserializer="str"))
    imp.apply(on_impression, stateful=True).to_topic(out)
    eng = app.dataframe(app.topic(a.engagement, value_deserializer="json", key_deserializer="str"))
    eng.update(on_engagement, stateful=True)
    live = app.dataframe(app.topic(a.live, value_deserializer="json", key_deserializer="str"))
    live.update(on_live)
    app.run()


if __name__ == "__main__":
    main()
