"""Memory preflight: the peak memory a calibration run needs, weighed against the machine before any weight is
read, so that a run that cannot fit is refused in one line that says what would fit (the kernel never kills it).

The estimate: the weights in the compute dtype (the whole model, or with ``--sequential`` the largest layer
twice: as read and as converted), plus one calibration step's live activations at the batch size (the
per-token estimate of :func:`~mone_jax.calib.calibration.default_batch_size`), plus the hidden states
``--sequential`` keeps between layers, plus :data:`RUNTIME` (Python, JAX, XLA and compiled code). On CPU
every device lives in host memory; an accelerator's own memory is checked per device (the replicated
parameters plus its share of the experts).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import UserError

RUNTIME = 1 << 30  # bytes: the interpreter, JAX / XLA and compiled steps (measured at ~0.4-0.8 GiB)
DEVICE_FILL = 0.9  # the share of an accelerator's memory a run may plan to use
GIB = 2**30


@dataclass(frozen=True)
class Need:
    """Peak bytes of a run, by part."""

    weights: int
    step: int
    hidden: int

    @property
    def total(self) -> int:
        return self.weights + self.step + self.hidden + RUNTIME

    def describe(self) -> str:
        parts = [f"weights {self.weights / GIB:.1f}", f"calibration step {self.step / GIB:.1f}"]
        if self.hidden:
            parts.append(f"hidden states {self.hidden / GIB:.1f}")
        return f"{self.total / GIB:.1f} GiB ({' + '.join(parts)} + runtime {RUNTIME / GIB:.1f})"


def host_available() -> int:
    """Bytes of host memory available now (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_bytes(cfg: ModelConfig, dtype: str) -> tuple[int, int, int]:
    """(replicated, expert-split, largest decoder layer) parameter bytes of the model in ``dtype``, from its
    config alone (abstract arrays: nothing is allocated or read)."""
    from flax import nnx

    from mone_jax.convert.load import resolve_dtype
    from mone_jax.model.causal_lm import DecoderLayer, MoEForCausalLM
    from mone_jax.model.sharding import param_bytes

    dt = resolve_dtype(dtype)
    rep, ex = param_bytes(nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0))))
    kinds = {cfg.moe_layers[i]: i for i in range(cfg.num_layers)}  # one dense and one MoE layer suffice
    layer = max(sum(param_bytes(nnx.eval_shape(lambda i=i: DecoderLayer(cfg, i, dt, nnx.Rngs(0)))))
                for i in kinds.values())
    return rep, ex, layer


def step_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Live activations of one calibration step over ``batch`` sequences of ``seq_len`` tokens."""
    per_token = 4 * (12 * cfg.hidden_size + cfg.num_experts + 8 * cfg.top_k + 2 * cfg.shared_expert_intermediate_size)
    return batch * seq_len * per_token


def need(cfg: ModelConfig, dtype: str, batch: int, seq_len: int, tokens: int, *, sequential: bool,
         sizes: tuple[int, int, int] | None = None) -> Need:
    """Peak host bytes of a calibration run of ``tokens`` tokens (see the module docstring)."""
    from mone_jax.convert.load import resolve_dtype

    rep, ex, layer = sizes or model_bytes(cfg, dtype)
    if sequential:
        return Need(2 * layer, step_bytes(cfg, batch, seq_len), tokens * cfg.hidden_size * resolve_dtype(dtype).itemsize)
    return Need(rep + ex, step_bytes(cfg, batch, seq_len), 0)


def check(cfg: ModelConfig, dtype: str, batch: int, seq_len: int, tokens: int, *, sequential: bool,
          batch_given: bool, devices: int = 1, device_bytes: int | None = None) -> int:
    """The batch size a run can use: ``batch`` when the estimate fits, a smaller one (said in a warning) when
    only that fits and the batch was chosen here; else a UserError naming what would fit (``--dtype bfloat16``,
    ``--sequential``, a smaller ``--batch-size``, a mesh of more devices)."""
    available = host_available()
    sizes = model_bytes(cfg, dtype)
    here = need(cfg, dtype, batch, seq_len, tokens, sequential=sequential, sizes=sizes)
    per_row = step_bytes(cfg, 1, seq_len)
    if device_bytes:  # an accelerator: its memory holds the replicated weights, its experts and its rows
        fits = _device_fits(sizes, per_row, batch, devices, device_bytes, sequential)
        if fits is not True:
            raise UserError(f"the model in {dtype} does not fit {devices} device(s) of {device_bytes / GIB:.1f} GiB at "
                            f"batch size {batch}: {fits}")
        return batch
    if here.total <= available:
        return batch
    rows = (available - here.total + here.step) // per_row
    rows -= rows % devices if rows >= devices else 0
    if rows >= 1:
        if batch_given:
            raise UserError(f"the run needs about {here.describe()} but {available / GIB:.1f} GiB of memory is "
                            f"available: use --batch-size {rows} or less")
        warnings.warn(f"batch size {batch} does not fit the {available / GIB:.1f} GiB of memory available "
                      f"(the run would need {here.describe()}): using batch size {rows}", stacklevel=2)
        return rows
    options = []
    small = 1
    if dtype == "float32" and (n := need(cfg, "bfloat16", small, seq_len, tokens, sequential=sequential)).total <= available:
        options.append(f"--dtype bfloat16 ({n.total / GIB:.1f} GiB)")
    if not sequential:
        for dt in dict.fromkeys((dtype, "bfloat16")):
            n = need(cfg, dt, small, seq_len, tokens, sequential=True)
            if n.total <= available:
                options.append(f"--sequential{'' if dt == dtype else ' --dtype bfloat16'} ({n.total / GIB:.1f} GiB)")
                break
    what = " or ".join(options) if options else "a machine with more memory (or a mesh of several hosts)"
    raise UserError(f"the run needs about {here.describe()} in {dtype}, but {available / GIB:.1f} GiB of memory is "
                    f"available: use {what}")


def _device_fits(sizes, per_row: int, batch: int, devices: int, device_bytes: int, sequential: bool):
    """True, or what would fit: the fewest devices over which the experts must be split."""
    rep, ex, layer = sizes
    room = DEVICE_FILL * device_bytes
    rows = math.ceil(batch / devices) * per_row
    if sequential:
        return True if 2 * layer + rows + RUNTIME / 8 <= room else "use a smaller --batch-size or more devices"
    for n in range(1, 1 << 16):
        if rep + ex / n + rows <= room:
            break
    else:
        return "the replicated weights alone do not fit: use --sequential"
    if n <= devices:
        return True
    return f"use a mesh of {n} devices (--mesh expert={n}) or more, or --sequential"
