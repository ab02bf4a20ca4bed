"""streamml: per-query scoring heads over frozen sentence embeddings, adapted online per user."""

__version__ = "0.1.0"
