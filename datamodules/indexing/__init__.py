"""From folders on disk to an index of pseudonymous cases, and seeded patient-disjoint splits of it."""
