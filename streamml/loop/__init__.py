"""The learning loop: the service's logs -> Parquet -> off-policy estimates -> promotion.

``python -m streamml.loop export`` writes the event log to Parquet (:mod:`streamml.loop.export`);
:mod:`streamml.loop.ope` estimates a target policy's accepts per slate from that log.
"""
