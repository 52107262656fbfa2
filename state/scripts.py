"""Lua scripts run by SHA over a pipeline, on one Redis server or a Redis Cluster.

Why not redis-py's ``register_script``: its pipeline support does not cover cluster pipelines, and a server
restarted mid-stream forgets its script cache. Here a script is loaded on every primary once, every batch of
calls goes in one pipelined round trip, and a NOSCRIPT answer reloads the script and resends the batch (each
call is atomic and idempotent, so resending is safe).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, client: Any, name: str) -> None:
        self.r = client
        self.source = resources.files("state").joinpath(f"lua/{name}").read_text()
        self._sha: str | None = None

    async def _load(self) -> str:
        return await self.r.script_load(self.source)  # a cluster client loads it on every primary

    async def run_many(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run each (keys, args) call atomically, all in one pipelined round trip; results in order."""
        if not calls:
            return []
        for attempt in range(2):
            if self._sha is None:
                self._sha = await self._load()
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(self._sha, len(keys), *keys, *args)
                    return await pipe.execute()
            except NoScriptError:  # a restarted (or failed-over) server lost its script cache
                if attempt:
                    raise
                self._sha = None
        raise AssertionError("unreachable")
