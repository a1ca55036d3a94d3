"""The Flax NNX model: blocks, MoE dispatch, sharding rules, KV-cache decoding."""
