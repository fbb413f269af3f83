"""Optimizers that limit how much of the network moves per step (MoFO)."""

from forgetless.optim.mofo import MoFO

__all__ = ["MoFO"]
