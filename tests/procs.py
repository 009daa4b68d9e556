"""Stopping one `ray start --head` by its temp dir, without `ray stop` (which would stop every
Ray instance of the user, the test session's included): pipelines/bench/cluster.py's."""
from pipelines.bench.cluster import kill_tree  # noqa: F401
