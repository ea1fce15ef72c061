"""The processor: events.raw -> validate, normalise, enrich, dedupe, route ->
events.enriched, events.dlq and dest.<name>, exactly once through Kafka transactions.

- pipeline.py: one raw record to its output records (pure; unit-tested without Kafka)
- normalise.py, enrich.py, routing.py, dedupe.py: the steps (dedupe.py also reads its changelog back)
- worker.py: the consumer group and the run loop: fetch, dispatch, one transaction per batch
- transactions.py: per-partition transactional producers: open, fence, reset, revoke, close
- partitions.py: a partition's status (with its transitions), its epoch, its batches
- topics.py: the topics it reads and writes, ensured at start (dest.* on first use)
- __main__.py: ``headwater-processor`` (HTTP /metrics /healthz /readyz, SIGTERM drain)

Contracts: proto/topics/events.enriched.md, events.dlq.md, dest.md.
"""
