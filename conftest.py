"""Doctest collection of ``streamml/``: skip modules whose optional extra is not installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("redis") else ["streamml/stores/redis.py"]  # the serve extra
