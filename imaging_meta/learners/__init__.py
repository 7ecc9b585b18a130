"""Learners: plain `nn.Module`s with `loss` and `predict`, free of Lightning and file I/O, one per file, grouped by family."""
