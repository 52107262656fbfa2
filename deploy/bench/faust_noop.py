"""Reference app for ``bench stream``: a Faust agent that does nothing but count, over the bench's input topics.

``python -m deploy.bench.faust_noop --bootstrap HOST:PORT --app-id ID --partitions N --progress FILE
--datadir DIR TOPIC [TOPIC ...]``

One agent over all the given topics, ``stream.take_events(500, within=0.05)`` (the worker's batching), no
decoding, no state, no output: Faust's own per-message ceiling on this machine (offsets are acknowledged and
committed as in the worker). Runs until SIGTERM. Plaintext Kafka only (the bench's own broker).
"""

from __future__ import annotations

import argparse

import faust

from deploy.bench.progress import Progress

BATCH, WITHIN_S = 500, 0.05  # as the stream worker's take_events (StreamConfig.batch_size, batch_within_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--app-id", required=True)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--progress", required=True)
    ap.add_argument("--datadir", required=True)
    ap.add_argument("topics", nargs="+")
    a = ap.parse_args()

    app = faust.App(a.app_id, broker=f"kafka://{a.bootstrap}", store="memory://", datadir=a.datadir,
                    key_serializer="raw", value_serializer="raw", topic_partitions=a.partitions,
                    consumer_auto_offset_reset="earliest", broker_commit_interval=1.0, web_enabled=False)
    topic = app.topic(*a.topics, key_type=bytes, value_type=bytes)
    progress = Progress(a.progress)

    @app.agent(topic)
    async def count(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(BATCH, within=WITHIN_S):
            progress.add(len(batch))

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
