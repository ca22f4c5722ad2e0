"""Registered-face datasets: the on-disk format, synthesis from the ICT model, and ingest."""
