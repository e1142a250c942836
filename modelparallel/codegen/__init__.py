"""modelparallel.codegen (under construction)."""
