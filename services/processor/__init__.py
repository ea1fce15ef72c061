"""The processor: events.raw -> validate, normalise, enrich, dedupe, route ->
events.enriched, events.dlq and dest.<name>, exactly once through Kafka transactions.

- pipeline.py: one raw record to its output records (pure; unit-tested without Kafka)
- normalise.py, enrich.py, routing.py, dedupe.py: the steps
- worker.py: the consumer group, per-partition transactional producers, rebalances
- __main__.py: ``headwater-processor`` (HTTP /metrics /healthz /readyz, SIGTERM drain)

Contracts: proto/topics/events.enriched.md, events.dlq.md, dest.md.
"""
