"""flexdist.masks (placeholder until its issue lands)."""
