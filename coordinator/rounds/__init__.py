"""The round loop of one run, in parts (issue 21); ``coordinator/run.py`` orchestrates them.

* ``tasks``: every task sent, as a ``TaskRecord`` (sealed, recorded, then published);
* ``context``: what the parts share (``RunContext``), site availability, the round commit;
* ``sync`` / ``asynchronous``: the two loops, each over its own aggregator interface
  (``coordinator/aggregators/interfaces.py``);
* ``evaluation``: validation, the periodic test and the final scores;
* ``result``: the result document and the privacy plan's announcement.
"""

from coordinator.rounds.context import RunContext, RunFailed
from coordinator.rounds.result import RunResult
from coordinator.rounds.tasks import TaskBook, TaskRecord

__all__ = ["RunContext", "RunFailed", "RunResult", "TaskBook", "TaskRecord"]
