"""Episode samplers (indices only, never pixels), episode files, self-supervised episodes, loaders and exact resume."""
