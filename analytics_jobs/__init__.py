"""Checkpoint analytics exporter: per-layer weight drift and parameter stability.

Runs beside training (usually on another machine), watches the Trainer's
checkpoint directory and publishes its findings on its own /metrics port.
"""
