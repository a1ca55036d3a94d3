"""Perplexity, log-likelihoods and plans compared on validation data."""
