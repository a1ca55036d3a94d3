"""``mone-jax diff``: how far apart two checkpoints' logits are on the same tokens (or one checkpoint's,
in JAX and in transformers), overall and per decoder layer.

Logits: max absolute difference, max relative difference (per token, ``|a - b| / |a|`` in the L2
norm over the vocabulary), top-1 agreement and mean KL(A || B) over positions, all in float64.
Where both sides are MoE models of the same family with the same layers, each layer's output
hidden state and each MoE block's output get the max absolute / relative difference too, so a
disagreement can be traced to the first layer where it appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mone_jax.base.errors import UserError
from mone_jax.model.causal_lm import capture_sown

DEFAULT_TEXT = ("The for statement in Python differs a bit from what you may be used to in C or Pascal. "
                "In the beginning, God created the heavens and the earth.")


@dataclass
class Taps:
    """Logits [B, T, V] of one model and, per layer, its output hidden state and MoE block output [B, T, d]."""

    logits: np.ndarray
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    moe: dict[int, np.ndarray] = field(default_factory=dict)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max over positions of ||a - b|| / ||a|| (L2 over the last axis)."""
    num = np.linalg.norm(a - b, axis=-1)
    den = np.linalg.norm(a, axis=-1)
    return float(np.max(num / np.maximum(den, np.finfo(np.float64).tiny)))


def array_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"max_abs": float(np.abs(a - b).max()), "max_rel": _rel(a, b)}


def logit_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max abs / relative difference, top-1 agreement and mean KL(softmax a || softmax b) of logits [..., V]."""
    if a.shape != b.shape:
        raise UserError(f"the two models give logits of shapes {list(a.shape)} and {list(b.shape)}: "
                        "compare checkpoints with the same vocabulary")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = np.sum(np.exp(la) * (la - lb), axis=-1)
    return {**array_diff(a, b), "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            "mean_kl": float(kl.mean())}


def jax_taps(folder: str | Path, ids: np.ndarray, dtype: str = "float32", layers: bool = True) -> Taps:
    """Logits of the JAX model of ``folder`` and (``layers``) every layer's output and MoE block output."""
    from mone_jax.convert.load import load_hf

    model = load_hf(folder, dtype, progress=False)
    x = jnp.asarray(ids, jnp.int32)
    if not layers:
        return Taps(np.asarray(model(x), np.float64))
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            layer.mlp = _Tap(layer.mlp)
        model.layers[i] = _Tap(layer)
    graphdef, state = nnx.split(model)
    logits, hidden, moe = _tapped(graphdef, state, x)
    return Taps(*jax.tree.map(lambda a: np.asarray(a, np.float64), (logits, hidden, moe)))


@partial(jax.jit, static_argnums=0)
def _tapped(graphdef, state, ids):
    """Logits, {layer: output} and {MoE layer: block output} of a model whose layers and MoE blocks are tapped."""
    model = nnx.merge(graphdef, state)
    (h, _), sown = capture_sown(model.hidden_states, ids, name="out")
    # sown keys: ("layers", i) for a layer, ("layers", i, "inner", "mlp") for its MoE block
    hidden = {int(path[1]): v for path, v in sown.items() if len(path) == 2}
    moe = {int(path[1]): v for path, v in sown.items() if len(path) > 2}
    return model.logits(h), hidden, moe


class _Tap(nnx.Module):
    """Calls ``inner`` (a decoder layer or MoE block, whose attributes it shows) and sows its output as ``out``."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        self.sow(nnx.Intermediate, "out", y)
        return y


def torch_taps(folder: str | Path, ids: np.ndarray, layers: bool = True) -> Taps:
    """The same from transformers (``trust_remote_code`` for exports that ship their modeling file)."""
    import torch

    from mone_jax.convert.families import family
    from mone_jax.convert.formats import torch_model
    from mone_jax.convert.load import config_of

    cfg = config_of(folder)
    try:
        model = torch_model(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"transformers cannot load '{folder}': {str(e).splitlines()[0]}") from None
    taps = Taps(np.zeros(0))
    hooks = []

    def keep(store: dict, i: int):
        def hook(_module, _inputs, output):
            store[i] = (output[0] if isinstance(output, tuple) else output).double().numpy()
        return hook

    if layers:
        fam = family(cfg.model_type)
        for i in range(cfg.num_layers):
            hooks.append(model.get_submodule(f"model.layers.{i}").register_forward_hook(keep(taps.hidden, i)))
            if cfg.moe_layers[i]:
                hooks.append(model.get_submodule(fam.moe_prefix(i)).register_forward_hook(keep(taps.moe, i)))
    try:
        with torch.no_grad():
            taps.logits = model(torch.as_tensor(np.asarray(ids, np.int64))).logits.double().numpy()
    finally:
        for h in hooks:
            h.remove()
    return taps


def same_layout(a: str | Path, b: str | Path) -> bool:
    """Both MoE models of the same family with the same layers (so their layers can be compared)."""
    from mone_jax.convert.families import family
    from mone_jax.convert.load import config_of

    ca, cb = config_of(a), config_of(b)
    return (family(ca.model_type) is family(cb.model_type) and ca.num_layers == cb.num_layers
            and ca.moe_layers == cb.moe_layers and ca.hidden_size == cb.hidden_size)


def compare(a: str | Path, b: str | Path | None, ids: np.ndarray, *, vs_torch: bool = False,
            dtype: str = "float32") -> dict:
    """The report of ``a`` vs ``b`` (both in JAX), or of ``a`` in JAX vs transformers (``vs_torch``)."""
    if vs_torch == (b is not None):
        raise UserError("give a second checkpoint B, or --vs-torch to compare A with its transformers forward")
    layers = vs_torch or same_layout(a, b)
    ta = jax_taps(a, ids, dtype, layers)
    tb = torch_taps(a, ids, layers) if vs_torch else jax_taps(b, ids, dtype, layers)
    report = {"a": str(a), "b": "transformers" if vs_torch else str(b), "tokens": list(ids.shape),
              "logits": logit_diff(ta.logits, tb.logits), "layers": {}}
    for i in sorted(ta.hidden):
        row = {"hidden": array_diff(ta.hidden[i], tb.hidden[i])}
        if i in ta.moe:
            row["moe"] = array_diff(ta.moe[i], tb.moe[i])
        report["layers"][i] = row
    return report


def table(report: dict) -> str:
    """The report as aligned text: one line for the logits, one per layer."""
    lg = report["logits"]
    lines = [f"A: {report['a']}", f"B: {report['b']}", f"tokens: {report['tokens']}",
             f"logits: max|diff| {lg['max_abs']:.3g}  max rel {lg['max_rel']:.3g}  top-1 agreement "
             f"{lg['top1_agreement']:.2%}  mean KL {lg['mean_kl']:.3g}"]
    if report["layers"]:
        lines.append(f"{'layer':>5}  {'hidden max|diff|':>16}  {'hidden max rel':>14}  {'moe max|diff|':>13}  "
                     f"{'moe max rel':>11}")
        for i, row in report["layers"].items():
            moe = row.get("moe")
            lines.append(f"{i:>5}  {row['hidden']['max_abs']:>16.3g}  {row['hidden']['max_rel']:>14.3g}  "
                         + (f"{moe['max_abs']:>13.3g}  {moe['max_rel']:>11.3g}" if moe else f"{'-':>13}  {'-':>11}"))
    return "\n".join(lines)


def token_ids_for(folder: str | Path, tokens: str | None, text: str | None, vocab_size: int) -> np.ndarray:
    """[B, T] ids from a .npy (``tokens``), or ``text`` (default: a fixed sample) with ``folder``'s tokenizer."""
    from mone_jax.app.data import load_tokenizer
    from mone_jax.base.tokens import token_ids

    if tokens is not None:
        try:
            ids = np.load(tokens, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read token ids from '{tokens}' ({e}): give a .npy of int token ids") from None
        return token_ids(ids, vocab_size, f"'{tokens}'")
    tok = load_tokenizer(folder)
    ids = tok(text or DEFAULT_TEXT, add_special_tokens=False)["input_ids"]
    return token_ids(np.asarray(ids), vocab_size, "the text")
