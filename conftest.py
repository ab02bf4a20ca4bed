"""Repository-wide pytest setup: shared fixture plugins, and doctest collection of
``streamml/`` without the modules whose optional extra is not installed."""

import importlib.util

pytest_plugins = [
    "tests.stores.redis_fixtures",  # redis_server, redis_cluster, ... (skip without Redis)
    "tests.serve.serve_fixtures",  # served_models, cfg: a catalog and logged heads for the service tests
]

collect_ignore = [] if importlib.util.find_spec("redis") else ["streamml/stores/redis.py"]  # the serve extra
