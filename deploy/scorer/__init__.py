"""The scoring worker: an HTTP ranking API over the newest model version, hot-swapped while it serves.

* ``config``  -- ``ScorerConfig`` (typed; read from ``deploy.config.Settings``)
* ``request`` -- ``/v1/rank`` body parsing and validation (4xx with a message)
* ``items``   -- the room/author snapshot shared by every request, refreshed in the background
* ``metrics`` -- the Prometheus metrics
* ``service`` -- the service: endpoints, ranking, model versions and their hot swap
* ``workers`` -- ``--workers N``: N service processes on one port (SO_REUSEPORT) under a supervisor
"""

from deploy.scorer.config import ScorerConfig
from deploy.scorer.request import BadRequest, RankRequest, parse_rank_request
from deploy.scorer.service import Scorer, Serving, run
from deploy.scorer.workers import run_workers

__all__ = ["BadRequest", "RankRequest", "Scorer", "ScorerConfig", "Serving", "parse_rank_request", "run",
           "run_workers"]
