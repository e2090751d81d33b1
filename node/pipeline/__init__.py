"""The pipeline: arrivals and completion of series, jobs, selection, prefetch, head start,
the worker that runs models, and the outbox that exports results."""
