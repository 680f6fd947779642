"""Names of the exchanges and queues of docs/design.md "Bus topology"."""

TASKS = "fedbus.tasks"  # direct, routing key = site id
UPDATES = "fedbus.updates"  # direct, routing key = federation
CONTROL = "fedbus.control"  # direct, routing key = federation (SiteHello, heartbeats)
# The liveness queue is bounded (docs/design.md "Bus topology"): a beat older than 300 s is dropped
# on arrival anyway (coordinator/liveness.STALE_S), and nobody may be watching it.
LIVENESS_TTL_MS = 300_000
LIVENESS_MAX_LENGTH = 10_000  # messages; the oldest go first (drop-head), never dead-lettered
DLX = "fedbus.dlx"  # dead-letter exchange (fanout)
DEAD = "fedbus.dead"  # the dead-letter queue
REASON_HEADER = "x-fedbus-reason"


def site_queue(site_id: str) -> str:
    """The queue a site reads its tasks (and RunControl) from."""
    return f"fedbus.site.{site_id}"


def updates_queue(federation: str) -> str:
    """The coordinator's queue for Update / EvalResult / Declined of one federation."""
    return f"fedbus.updates.{federation}"


def control_queue(federation: str) -> str:
    """The coordinator's queue for SiteHello of one federation."""
    return f"fedbus.control.{federation}"


def liveness_queue(federation: str) -> str:
    """A second copy of every control message of one federation, for whoever watches site
    liveness between runs (the dashboard): never the coordinator's hellos themselves."""
    return f"fedbus.liveness.{federation}"
