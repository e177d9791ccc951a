"""Running peftfleet on Ray: the client, the job runner, the reconciler, the CLI.

>>> from orchestrator import Client
>>> job = Client().submit("job.yaml")        # doctest: +SKIP
"""

from orchestrator.client import Client, JobHandle
from orchestrator.feasibility import InfeasibleJob

__all__ = ["Client", "InfeasibleJob", "JobHandle"]
