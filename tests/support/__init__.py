"""Helpers shared by the test modules: live-chain helpers, torchrun workers, tiny models, bounds, skip markers."""
