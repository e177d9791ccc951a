"""Store fixtures shared with tests/jobs (a real SQLite store, and PostgreSQL when one is reachable)."""

from tests.jobs.conftest import store, store_url  # noqa: F401 - fixtures
from tests.jobs.test_adapter_registry import bases  # noqa: F401 - fixture
