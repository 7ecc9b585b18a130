"""Transfer baselines: fine-tuning a new head, logistic regression on frozen features."""
