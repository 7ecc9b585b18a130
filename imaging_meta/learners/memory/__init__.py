"""Memory-based learners: MANN."""
