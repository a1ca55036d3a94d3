"""Train the shipped demo model: a small Qwen3-MoE language model with this project's Flax model + optax.

    python scripts/train_demo.py                 # reads ../shared/corpus/{train,valid}.txt
    python scripts/train_demo.py --steps 20 --out /tmp/demo   # a quick smoke run

Steps: a byte-level BPE tokenizer (``tokenizers``) on the training text; paragraphs joined with
EOS into one token stream; AdamW with warmup + cosine decay on random windows of that stream,
next-token cross entropy plus a Switch-style load-balancing loss on every router; the result is
written as a Hugging Face folder (config.json, model.safetensors with Qwen3-MoE key names,
tokenizer, generation config, model card) that transformers loads unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mone_jax.app.data import load_token_blocks
from mone_jax.convert.families import parse_config
from mone_jax.convert.state_dict import hf_state_dict
from mone_jax.evaluate.perplexity import perplexity, unigram_perplexity
from mone_jax.model.causal_lm import MoEForCausalLM, capture_sown, route

REPO = Path(__file__).resolve().parents[1]

EOS = "<|endoftext|>"
CORPUS = REPO.parent / "shared" / "corpus"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(CORPUS / "train.txt"))
    ap.add_argument("--valid", default=str(CORPUS / "valid.txt"))
    ap.add_argument("--out", default=str(REPO / "mone_jax" / "demo" / "model"))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=96, help="moe_intermediate_size")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--eval-blocks", type=int, default=256, help="validation blocks of --seq-len tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=512, help="rows per expert block of the CPU dispatch (speed only)")
    return ap.parse_args(argv)


def paragraphs(path: str) -> list[str]:
    """Documents of a text file split as ``mone_jax.app.data`` splits them: at blank lines, stripped, non-empty."""
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def train_tokenizer(docs: list[str], vocab: int):
    """Byte-level BPE with one special token, EOS, that also serves as BOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def write_tokenizer(out: Path, tok) -> None:
    """tokenizer.json plus a tokenizer_config.json naming transformers' generic PreTrainedTokenizerFast."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
           "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def token_stream(tok, docs: list[str]) -> np.ndarray:
    """Documents tokenized without special tokens and joined with EOS: int32 [n]."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for i in range(0, len(docs), 4096):
        for enc in tok.encode_batch(docs[i:i + 4096], add_special_tokens=False):
            if out:
                out.append(eos)
            out.extend(enc.ids)
    return np.asarray(out, np.int32)


def hf_config(args: argparse.Namespace, eos_id: int) -> dict:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.expert_size, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        router_aux_loss_coef=args.aux_coef, architectures=["Qwen3MoeForCausalLM"], dtype="float32",
    ).to_dict()


def record_router_logits(model: MoEForCausalLM) -> MoEForCausalLM:
    """Make every MoE block sow its router logits (for the load-balancing loss); before tracing."""
    for blk in model.moe_blocks().values():
        blk.sow_router = True
    return model


def forward(model: MoEForCausalLM, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, T, V] from the model's own forward and the mean load-balancing loss over MoE layers,
    from the router logits the blocks sow (see :func:`record_router_logits`)."""
    cfg = model.config
    (h, _), sown = capture_sown(model.hidden_states, ids, name="router_logits")
    balance = []
    for router_logits in sown.values():
        chosen, _ = route(router_logits, cfg)
        frac = jax.nn.one_hot(chosen, cfg.num_experts).sum(1).mean(0) / cfg.top_k  # [E] share of assignments
        prob = jax.nn.softmax(router_logits.astype(jnp.float32), -1).mean(0)  # [E] mean router probability
        balance.append(cfg.num_experts * jnp.sum(frac * prob))
    return model.logits(h), jnp.mean(jnp.stack(balance))


def losses(model: MoEForCausalLM, batch: jax.Array, aux_coef: float):
    logits, balance = forward(model, batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return ce + aux_coef * balance, (ce, balance)


def make_step(graphdef, tx, aux_coef: float):
    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch):
        def loss_fn(p):
            return losses(nnx.merge(graphdef, p, rest), batch, aux_coef)

        (_, (ce, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, balance

    return step


def write_folder(out: Path, model: MoEForCausalLM, eos: int, config: dict, card: str) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in hf_state_dict(model).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": True,
           "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "README.md").write_text(card)


def model_card(args: argparse.Namespace, facts: dict) -> str:
    defaults = vars(parse_args([]))
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != defaults[k] and k != "out"]
    cmd = " ".join(["python scripts/train_demo.py", *changed])
    return f"""---
license: apache-2.0
library_name: transformers
tags: [mixture-of-experts, qwen3_moe, mone-jax, demo]
---
# mone-jax demo MoE model

A deliberately tiny Qwen3-MoE language model shipped inside `mone-jax` so that
`mone-jax prune` works with nothing downloaded. It writes plausible Python-documentation and
Bible-like English, nothing more: use it to try the tools, not as a language model.

## Architecture

Qwen3-MoE layout (`model_type: qwen3_moe`, loads with stock `transformers`): {args.layers} layers, hidden
{args.hidden}, {args.heads} query / {args.kv_heads} key-value heads of dim {args.hidden // args.heads} with
per-head q/k RMSNorm, RoPE (theta 10000), every MLP a MoE of {args.experts} routed SwiGLU experts of width
{args.expert_size}, top-{args.top_k} softmax routing with `norm_topk_prob`, no shared expert, tied input /
output embeddings, {facts['params']:,} parameters stored in float32. Tokenizer: byte-level BPE,
{args.vocab} tokens, trained with `tokenizers` on the same text; `{EOS}` (id {facts['eos']}) is EOS,
BOS and padding.

## Training

- Data: `train.txt` of the mone-jax shared corpus (the Python 3.11 documentation sources and the
  World English Bible; first 85% of each source), paragraphs (blank-line separated) joined with EOS
  into one stream of {facts['train_tokens']:,} tokens.
- {args.steps} steps of {args.batch_size} random windows of {args.seq_len} tokens
  ({facts['seen_tokens']:,} tokens seen), AdamW (b1 0.9, b2 0.95, weight decay {args.weight_decay} on
  matrices), peak learning rate {args.lr} after {args.warmup} warmup steps, cosine decay to 10%,
  gradient clipping at 1.0, seed {args.seed}.
- Loss: next-token cross entropy + {args.aux_coef} x the Switch-Transformer load-balancing loss
  (num_experts x sum_e fraction_e x mean_probability_e, averaged over layers), so that all experts
  are used and specialise.
- Code: this project's Flax NNX model (`mone_jax.model.causal_lm`) and optax; JAX {jax.__version__} on CPU,
  {facts['minutes']:.1f} minutes of training wall-clock time on {os.cpu_count()} cores.

## Quality

On {facts['eval_tokens']:,} predicted tokens of `valid.txt` (the next 5% of each source; {args.eval_blocks}
windows of {args.seq_len} tokens at seeded random offsets, `load_token_blocks(..., seed=0)`):
perplexity **{facts['valid_ppl']:.2f}**, against
{facts['unigram_ppl']:.2f} for a unigram model of the training tokens (add-one smoothing). To check it
(from the repository root, with `../shared/corpus/` present):

```bash
mone-jax eval mone_jax/demo/model --data ../shared/corpus/valid.txt --num-samples {args.eval_blocks} --seq-len {args.seq_len} --seed 0
```

## Reproduce

From the repository root, with `../shared/corpus/` present:

```bash
{cmd}
```

(Settings: {', '.join(f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items()
                     if k not in ('train', 'valid', 'out'))}.)
Tokenizer, initialisation and data order are seeded; the weights may still differ in the last bits
from this folder's (multi-threaded CPU reductions are not bit-reproducible).
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    docs = paragraphs(args.train)
    tokenizer = train_tokenizer(docs, args.vocab)
    stream = token_stream(tokenizer, docs)
    eos = tokenizer.token_to_id(EOS)
    print(f"tokenizer {tokenizer.get_vocab_size()} tokens; train stream {stream.size:,} tokens "
          f"({time.time() - t0:.0f}s)", flush=True)

    config = hf_config(args, eos)
    model = record_router_logits(MoEForCausalLM(parse_config(config), jnp.float32, rngs=nnx.Rngs(args.seed)))
    model.block = args.block
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.1)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))
    opt_state = tx.init(params)
    step = make_step(graphdef, tx, args.aux_coef)

    rng = np.random.default_rng(args.seed)
    span = args.seq_len + 1
    t_train = time.time()
    for i in range(1, args.steps + 1):
        starts = rng.integers(0, stream.size - span, size=args.batch_size)
        batch = jnp.asarray(stream[starts[:, None] + np.arange(span)])
        params, opt_state, ce, balance = step(params, opt_state, rest, batch)
        if i % 50 == 0 or i == 1 or i == args.steps:
            el = time.time() - t_train
            print(f"step {i}/{args.steps} ce {float(ce):.4f} balance {float(balance):.4f} "
                  f"lr {float(schedule(i)):.2e} {i * args.batch_size * args.seq_len / el:.0f} tok/s "
                  f"{el / 60:.1f} min", flush=True)
    jax.block_until_ready(params)
    minutes = (time.time() - t_train) / 60
    model = nnx.merge(graphdef, params, rest)

    out = Path(args.out)
    write_tokenizer(out, tokenizer)
    blocks = load_token_blocks(args.valid, tokenizer_dir=out, num_samples=args.eval_blocks, seq_len=args.seq_len,
                               seed=0)
    ev = perplexity(model, blocks)
    uni = unigram_perplexity(stream, blocks, args.vocab)
    print(f"valid perplexity {ev['perplexity']:.3f} over {ev['tokens']} tokens; unigram {uni:.3f}", flush=True)

    facts = {"params": n_params, "eos": eos, "train_tokens": int(stream.size),
             "seen_tokens": args.steps * args.batch_size * args.seq_len, "minutes": minutes,
             "eval_tokens": ev["tokens"], "valid_ppl": ev["perplexity"], "unigram_ppl": uni}
    write_folder(out, model, eos, config, model_card(args, facts))
    print(f"wrote {args.out} ({json.dumps({k: v for k, v in facts.items() if k != 'eos'})})", flush=True)


if __name__ == "__main__":
    main()
