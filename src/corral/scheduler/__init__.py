"""Placement as pure functions of a cluster snapshot and a job."""
