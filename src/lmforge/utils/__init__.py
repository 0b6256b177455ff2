"""Small pure helpers shared by every layer: atomic file writes, logging, seeding, dist info."""
