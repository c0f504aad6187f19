"""Optimizers that drop into any torch training loop and step each param group natively."""

from .adafactor import Adafactor, AdafactorSR
from .adam import Adam, AdamW
from .backward import StepInBackward
from .base import NativeOptimizer
from .muon import Muon
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adafactor", "AdafactorSR", "Muon", "NativeOptimizer", "StepInBackward"]
