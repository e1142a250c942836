"""modelparallel.runtime (under construction)."""
