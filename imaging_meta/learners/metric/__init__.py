"""Metric-based learners: prototypical networks (classification and segmentation), Siamese, Matching."""
