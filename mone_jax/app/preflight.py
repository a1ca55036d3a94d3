"""Memory preflight: the peak memory a calibration run needs, weighed against the machine before any weight is
read, so that a run that cannot fit is refused in one line that says what would fit (the kernel never kills it).

The estimate follows what the loader holds (:mod:`mone_jax.convert.load`): the weights in the compute dtype
(the whole model, or with ``--sequential`` its largest decoder layer: one layer is alive at a time), plus what
loading one layer holds beside its converted weights (two raw copies, the host array and the one XLA
converts, of every array that is transposed or cast on load: non-expert matrices, read as stored, or as
float32 where quantized; expert stacks only when cast or transposed), plus one calibration step's live
activations at the batch size (the per-token estimate of
:func:`~mone_jax.calib.calibration.default_batch_size`; never more rows than the data has), plus the hidden
states ``--sequential`` keeps between layers, plus :data:`RUNTIME` (Python, JAX, XLA and compiled code).
bench/README.md compares it with measured peaks. On CPU every device lives in host memory; an accelerator's
own memory is checked per device (the replicated parameters plus its share of the experts).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import UserError

RUNTIME = 1 << 29  # bytes: the interpreter, JAX / XLA, compiled steps (0.0-0.4 GiB beyond the rest, bench/README.md)
DEVICE_FILL = 0.9  # the share of an accelerator's memory a run may plan to use
GIB = 2**30


@dataclass(frozen=True)
class Need:
    """Peak bytes of a run, by part."""

    weights: int
    load: int
    step: int
    hidden: int

    @property
    def total(self) -> int:
        return self.weights + self.load + self.step + self.hidden + RUNTIME

    def describe(self) -> str:
        parts = [f"weights {self.weights / GIB:.1f}", f"loading {self.load / GIB:.1f}",
                 f"calibration step {self.step / GIB:.1f}"]
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


@dataclass(frozen=True)
class Source:
    """How a checkpoint stores its weights, as far as loading them costs memory: bytes per plain value,
    whether its decoder layers' projections are quantized (dequantized to float32 on the host, expert stacks
    straight into the compute dtype; embeddings and head never are), and whether its expert stacks are
    transposed on load (GPT-OSS)."""

    itemsize: int = 4
    quantized: bool = False
    fused_experts: bool = False


def source_of(folder, cfg: ModelConfig) -> Source:
    """The :class:`Source` of the checkpoint in ``folder``: its config.json and safetensors headers (the width
    most of its plain float bytes are stored in); no weight is read."""
    from collections import Counter

    from mone_jax.convert.families import family
    from mone_jax.convert.reader import CheckpointReader, read_config

    widths: Counter[int] = Counter()
    with CheckpointReader(folder) as r:
        for key in r.stored.keys():
            dt = r.stored.dtype(key)
            if dt.kind in "fV" and dt.itemsize > 1:  # not float8 / packed parts
                widths[dt.itemsize] += math.prod(r.stored.shape(key)) * dt.itemsize
    itemsize = widths.most_common(1)[0][0] if widths else 4
    return Source(itemsize, "quantization_config" in read_config(folder), family(cfg.model_type).fused_on_disk)


@dataclass(frozen=True)
class Footprint:
    """Parameter bytes of a model in a compute dtype, and the extra bytes its loading holds at its worst moment."""

    replicated: int
    experts: int
    layer: int  # the largest decoder layer
    load_whole: int  # whole model: beyond all its weights, while the layer that peaks is converted
    load_layer: int  # one layer at a time (--sequential): beyond the largest layer

    @property
    def total(self) -> int:
        return self.replicated + self.experts


def footprint(cfg: ModelConfig, dtype: str, source: Source = Source()) -> Footprint:
    """:class:`Footprint` of the model, from its config alone (abstract arrays: nothing is allocated or read).

    Loading goes unit by unit (the embeddings and head, then each decoder layer); a unit's raw arrays and its
    converted ones are alive together during its one conversion step. An array is converted when it is
    transposed (every non-expert matrix but the embedding: checkpoints store ``[out, in]``, the model holds
    ``[in, out]``; GPT-OSS's expert stacks) or when its stored dtype is not its compute dtype."""
    import jax.numpy as jnp
    from flax import nnx

    from mone_jax.convert.load import resolve_dtype
    from mone_jax.model.causal_lm import MoEForCausalLM
    from mone_jax.model.sharding import is_expert

    dt = resolve_dtype(dtype)
    state = nnx.state(nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0))))
    held: dict[object, list[int]] = {}  # unit -> [replicated, experts, raw copies]
    for path, var in nnx.to_flat_state(state):
        a, expert = var.get_value(), is_expert(var)
        unit = path[1] if path[0] == "layers" else "head"
        n = math.prod(a.shape)
        sizes = held.setdefault(unit, [0, 0, 0])
        sizes[expert] += n * jnp.dtype(a.dtype).itemsize
        if not jnp.issubdtype(a.dtype, jnp.floating):
            continue
        if expert:
            raw = dt.itemsize if source.quantized else source.itemsize
            swapped = source.fused_experts
        else:
            raw = 4 if source.quantized and a.ndim >= 2 and unit != "head" else source.itemsize
            swapped = a.ndim >= 2 and path[0] != "embed"
        if swapped or raw != jnp.dtype(a.dtype).itemsize:
            sizes[2] += 2 * n * raw  # the host array, and the copy XLA converts (it cannot donate adopted memory)
    rep, ex = (sum(v[k] for v in held.values()) for k in (0, 1))
    layers = [v for u, v in held.items() if u != "head"] or [[0, 0, 0]]
    cum = peak = 0
    for r, e, t in [held.get("head", [0, 0, 0]), *(held[i] for i in range(cfg.num_layers))]:
        peak = max(peak, cum + r + e + t)
        cum += r + e
    largest = max(r + e for r, e, _ in layers)
    return Footprint(rep, ex, largest, max(0, peak - cum), max(r + e + t for r, e, t in layers) - largest)


def model_bytes(cfg: ModelConfig, dtype: str) -> tuple[int, int, int]:
    """(replicated, expert-split, largest decoder layer) parameter bytes of the model in ``dtype``."""
    f = footprint(cfg, dtype)
    return f.replicated, f.experts, f.layer


def step_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Live activations of one calibration step over ``batch`` sequences of ``seq_len`` tokens."""
    per_token = 4 * (12 * cfg.hidden_size + cfg.num_experts + 8 * cfg.top_k + 2 * cfg.shared_expert_intermediate_size)
    return batch * seq_len * per_token


def need(cfg: ModelConfig, dtype: str, batch: int, seq_len: int, tokens: int, *, sequential: bool,
         source: Source = Source(), sizes: Footprint | None = None) -> Need:
    """Peak host bytes of a calibration run of ``tokens`` tokens (see the module docstring)."""
    from mone_jax.convert.load import resolve_dtype

    f = sizes or footprint(cfg, dtype, source)
    if tokens:  # a batch never holds more rows than the data has
        batch = min(batch, -(-tokens // seq_len))
    if sequential:
        return Need(f.layer, f.load_layer, step_bytes(cfg, batch, seq_len),
                    tokens * cfg.hidden_size * resolve_dtype(dtype).itemsize)
    return Need(f.total, f.load_whole, step_bytes(cfg, batch, seq_len), 0)


def check(cfg: ModelConfig, dtype: str, batch: int, seq_len: int, tokens: int, *, sequential: bool,
          batch_given: bool, devices: int = 1, device_bytes: int | None = None, source: Source = Source()) -> int:
    """The batch size a run can use: ``batch`` when the estimate fits, a smaller one (said in a warning) when
    only that fits and the batch was chosen here; else a UserError naming what would fit (``--dtype bfloat16``,
    ``--sequential``, a smaller ``--batch-size``, a mesh of more devices); ``source``: how the checkpoint stores
    its weights (:func:`source_of`)."""
    available = host_available()
    sizes = footprint(cfg, dtype, source)
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
    if dtype == "float32" and (n := need(cfg, "bfloat16", small, seq_len, tokens, sequential=sequential,
                                         source=source)).total <= available:
        options.append(f"--dtype bfloat16 ({n.total / GIB:.1f} GiB)")
    if not sequential:
        for dt in dict.fromkeys((dtype, "bfloat16")):
            n = need(cfg, dt, small, seq_len, tokens, sequential=True, source=source)
            if n.total <= available:
                options.append(f"--sequential{'' if dt == dtype else ' --dtype bfloat16'} ({n.total / GIB:.1f} GiB)")
                break
    what = " or ".join(options) if options else "a machine with more memory (or a mesh of several hosts)"
    raise UserError(f"the run needs about {here.describe()} in {dtype}, but {available / GIB:.1f} GiB of memory is "
                    f"available: use {what}")


def _device_fits(sizes: Footprint, per_row: int, batch: int, devices: int, device_bytes: int, sequential: bool):
    """True, or what would fit: the fewest devices over which the experts must be split."""
    rep, ex = sizes.replicated, sizes.experts
    room = DEVICE_FILL * device_bytes
    rows = math.ceil(batch / devices) * per_row
    if sequential:
        fits = sizes.layer + sizes.load_layer + rows + RUNTIME / 8 <= room
        return True if fits else "use a smaller --batch-size or more devices"
    for n in range(1, 1 << 16):
        if rep + ex / n + rows <= room:
            break
    else:
        return "the replicated weights alone do not fit: use --sequential"
    if n <= devices:
        return True
    return f"use a mesh of {n} devices (--mesh expert={n}) or more, or --sequential"
