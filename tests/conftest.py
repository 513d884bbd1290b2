"""Shared test setup. The helpers the test modules import live in tests/support/ (skip markers: support.runif)."""

from __future__ import annotations

import torch

# The models here are tiny: intra-op threads only add contention on a 2-core
# CI machine (measured: 2 threads ran a demo step up to 40x slower under load).
torch.set_num_threads(1)
