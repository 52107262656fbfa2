"""Turn a time-ordered event stream into labelled samples without Kafka, through the stream's own code.

Used for offline benchmarks and datasets: the same state writes (real Redis), the same label join and
the same feature assembly as the Faust app, with stream time taken from the events themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from model.batch import SampleArrays
from model.spec import FeatureSpec
from state.store import LiveState
from stream.events import Event
from stream.join import LabelJoiner
from stream.processor import Input, StreamProcessor


async def build_samples(events: Iterable[Event], state: LiveState, spec: FeatureSpec, joiner: LabelJoiner,
                        batch_size: int = 512, on_batch: Callable[[int], None] | None = None,
                        ) -> tuple[SampleArrays, list[str]]:
    """Replay ``events`` (time-ordered) and return the samples in emission order with impression ids."""
    proc = StreamProcessor(state, spec, joiner)  # join state in memory; state writes unpositioned
    encoded: list[bytes] = []

    async def close(watermark_ms: int) -> None:
        encoded.extend(s.value for s in await proc.close_due(watermark_ms))

    batch: list[Input] = []
    for ev in events:
        batch.append(Input(ev))
        if len(batch) >= batch_size:
            await proc.on_events(batch)
            await close(batch[-1].event.ts_ms)  # events are time-ordered: the last one is stream time
            if on_batch:
                on_batch(len(batch))
            batch = []
    if batch:
        await proc.on_events(batch)
    await close(2**62)  # end of stream closes every window
    decoded = proc.codec.decode(encoded)
    return decoded.arrays, decoded.impression_ids
