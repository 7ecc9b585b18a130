"""Gradient-based learners: MAML, Meta-SGD, ANIL, Reptile, Meta-LSTM."""
