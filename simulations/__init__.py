"""Runnable fl_ugm experiments; shared datasets, models and training live in ``tasks``."""
