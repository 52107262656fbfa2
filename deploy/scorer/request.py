"""``/v1/rank`` request bodies: parsed and validated, or refused with a 4xx that says what is wrong and where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class RankRequest:
    user_id: str
    candidates: list[tuple[str, str, str]]  # (room_id, author_id, category)
    hour: int | None
    device: str
    tab: str
    ts_ms: int | None


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({type(value).__name__})"


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool, allow_empty: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadRequest(422, f"{where}{key} is required (a {'non-empty ' if not allow_empty else ''}string)")
        return ""
    if not isinstance(value, str) or (not allow_empty and not value):
        raise BadRequest(422, f"{where}{key} must be a {'non-empty ' if not allow_empty else ''}string, "
                              f"got {_show(value)}")
    return value


def _int(obj: dict[str, Any], key: str, where: str, lo: int, hi: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bounds = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise BadRequest(422, f"{where}{key} must be an integer {bounds}, got {_show(value)}")
    return value


def parse_rank_request(body: bytes, max_candidates: int) -> RankRequest:
    """Validate a ``/v1/rank`` body; ``BadRequest(status, message)`` says what is wrong and where.

    >>> parse_rank_request(b'{"user_id": "u1", "candidates": [{"room_id": "r1", "author_id": "a1"}]}', 10)
    RankRequest(user_id='u1', candidates=[('r1', 'a1', '')], hour=None, device='', tab='', ts_ms=None)
    >>> parse_rank_request(b'{"user_id": "u1", "candidates": [{"room_id": 7}]}', 10)
    Traceback (most recent call last):
    ...
    deploy.scorer.request.BadRequest: candidates[0].room_id must be a non-empty string, got 7 (int)
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"body must be a JSON object with user_id, candidates and context, got {_show(data)}")
    user = _string(data, "user_id", "", required=True, allow_empty=False)
    cands = data.get("candidates")
    if not isinstance(cands, list):
        raise BadRequest(422, "candidates is required: a list of {room_id, author_id, category?} objects" +
                         ("" if cands is None else f", got {_show(cands)}"))
    if len(cands) > max_candidates:
        raise BadRequest(413, f"too many candidates: {len(cands)} > max_candidates={max_candidates}; "
                              f"split the request")
    out = []
    for i, c in enumerate(cands):
        where = f"candidates[{i}]."
        if not isinstance(c, dict):
            raise BadRequest(422, f"candidates[{i}] must be an object with room_id and author_id, got {_show(c)}")
        # author_id may be "": assembly then uses the author the room's state knows.
        out.append((_string(c, "room_id", where, required=True, allow_empty=False),
                    _string(c, "author_id", where, required=True),
                    _string(c, "category", where, required=False)))
    ctx = data.get("context")
    if ctx is None:
        ctx = {}
    if not isinstance(ctx, dict):
        raise BadRequest(422, f"context must be an object with optional hour, device, tab, ts_ms; got {_show(ctx)}")
    return RankRequest(
        user_id=user, candidates=out, hour=_int(ctx, "hour", "context.", 0, 23),
        device=_string(ctx, "device", "context.", required=False), tab=_string(ctx, "tab", "context.", required=False),
        ts_ms=_int(ctx, "ts_ms", "context.", 0),
    )
