"""The precision of float32 matrix products: one switch for every matmul the model traces.

JAX's backend default for a float32 ``dot`` is one bfloat16 pass on TPU and TensorFloat-32 on recent GPUs
(full float32 on CPU). :func:`matmul_precision` sets ``jax.default_matmul_precision`` for the code run
inside it, so that every product traced there without an explicit precision (attention projections, router,
experts, head) carries it. The setting is part of JAX's trace context: a jitted function traced under
``highest`` is cached apart from the same function traced under ``default``, so the two never share a
compiled program. The command line enters it around a whole command (``--precision``, default
:func:`default_for` the compute dtype); from Python::

    with matmul_precision("highest"):
        stats = calibrate(model, batches)

:func:`current` names the precision in effect; the statistics file and the model card record it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mone_jax.base.errors import UserError  # light: JAX is imported where a function needs it

PRECISIONS = ("highest", "default")  # full float32 products, or the backend's default (fast) pass
_JAX = {"highest": "highest", "default": None}  # None: the backend default, also inside an outer "highest"


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else a UserError naming them."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}")
    return name


def default_for(dtype) -> str:
    """``highest`` for a float32 compute dtype (its products kept in float32), ``default`` for bfloat16 / float16
    (whose inputs a fast pass already represents exactly). Light: no JAX import (the parser uses it)."""
    if isinstance(dtype, str):
        return "highest" if dtype == "float32" else "default"
    return "highest" if np.dtype(getattr(dtype, "dtype", dtype)) == np.float32 else "default"


@contextmanager
def matmul_precision(name: str) -> Iterator[str]:
    """Trace (and so compile) every matmul without an explicit precision at ``name`` (:data:`PRECISIONS`)
    inside the block; yields the name."""
    import jax

    with jax.default_matmul_precision(_JAX[check_precision(name)]):
        yield name


def current() -> str:
    """The precision in effect: ``highest``, ``default``, or JAX's own name of another setting (e.g.
    ``tensorfloat32`` set through ``jax.config``)."""
    import jax

    value = jax.config.jax_default_matmul_precision
    if value is None or value in ("default", "fastest", "bfloat16"):
        return "default"
    return "highest" if value in ("highest", "float32") else str(value)
