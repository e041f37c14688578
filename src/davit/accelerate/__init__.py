"""Every speed trick of davit, behind one seam.

The model in :mod:`davit.models` is the reference: plain public torch that every tool understands. This package
swaps its modules, in place and with the same ``state_dict``, for subclasses that run fused kernels (oneDNN epilogues
on the CPU, SDPA, memory-saving autograd functions for training), decided once when installed by a :class:`Policy`
that is detected for the machine or passed in. ``davit.optimize`` installs it on its own copy of a model, the
training loop on the model it trains (``train.accelerate``); a model from ``create_model`` runs the reference until
you ask. The off switch: ``enabled=False`` / ``train.accelerate=false`` / ``optimize(..., accelerate=False)``, or
``DAVIT_ACCELERATE=0`` in the environment for the whole process.

Where a new fast path goes: a kernel (a function or autograd Function that takes the policy) in ``kernels.py``, any
private or version-bound torch API it needs in ``compat.py`` with a plain fallback, a subclass of the reference module
in ``modules.py`` that calls it (registered in ``_FAST``), a policy field if it needs a threshold, and a test in
``tests/test_accelerate.py`` that the accelerated module equals the reference (values and gradients) under each policy.
"""

from __future__ import annotations

from .modules import install, installed, uninstall
from .policy import ENV_SWITCH, Policy, accelerate_enabled

__all__ = ["ENV_SWITCH", "Policy", "accelerate_enabled", "install", "installed", "uninstall"]
