"""Scoring (one record schema), method names, statistics, reports, plots and metrics."""
