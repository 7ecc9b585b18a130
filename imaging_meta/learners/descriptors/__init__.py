"""Descriptor baselines and the task-adaptive choice: fixed image descriptors (raw pixels, intensity and
gradient-magnitude histograms), a nearest-prototype / logistic-regression classifier on them, and a learner that
picks, per task, between a meta-trained embedding and the descriptors by leave-one-out over the support."""
