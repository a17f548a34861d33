"""flexdist.model (placeholder until its issue lands)."""
