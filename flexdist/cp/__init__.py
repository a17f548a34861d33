"""flexdist.cp (placeholder until its issue lands)."""
