"""One router per resource: ``ops`` (health, readiness, metrics, pages), ``rank`` (rank, reward,
feedback, queries), ``users`` (see and forget a user), ``model`` (the served head, reload, rollback)."""
