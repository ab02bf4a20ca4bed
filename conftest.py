"""Repository-wide pytest setup: shared fixture plugins, and doctest collection of
``streamml/`` without the modules whose optional extra is not installed."""

import importlib.util

pytest_plugins = ["tests.stores.redis_fixtures"]  # redis_server, redis_cluster, ... (skip without Redis)

collect_ignore = [] if importlib.util.find_spec("redis") else ["streamml/stores/redis.py"]  # the serve extra
