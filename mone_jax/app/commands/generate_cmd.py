"""``mone-jax generate``: text prompts continued by the model (KV-cache decoding)."""

from __future__ import annotations

import json
from pathlib import Path

from mone_jax.app.commands.common import load_model
from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase


def run(args) -> None:
    from mone_jax.app.data import load_tokenizer
    from mone_jax.model.decoding import generate

    if args.max_new_tokens < 0 or args.temperature < 0:
        raise UserError("--max-new-tokens and --temperature must be >= 0")
    tokenizer = load_tokenizer(args.model, args.model)
    prompts = [tokenizer(text)["input_ids"] for text in args.prompt]
    if not all(prompts):
        raise UserError("a --prompt encodes to no tokens; give some text")
    model = load_model(args)
    phase("generate", f"{len(prompts)} prompt(s), up to {args.max_new_tokens} new tokens (the first batch compiles)")
    gen_cfg = Path(args.model) / "generation_config.json"  # its EOS ids (a list for chat models) win
    eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.is_file() else None
    new = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   eos_token_id=eos, pad_id=tokenizer.pad_token_id)
    for prompt, tokens in zip(prompts, new):
        print(tokenizer.decode(prompt + tokens, skip_special_tokens=True))
