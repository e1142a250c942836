"""modelparallel.partitioner (under construction)."""
