"""modelparallel.tracer (under construction)."""
