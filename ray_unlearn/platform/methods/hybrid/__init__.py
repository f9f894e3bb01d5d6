"""Hybrid exact/approximate unlearning: workload estimate, DPUS, HS and OHS."""
