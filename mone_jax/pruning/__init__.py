"""Scoring experts, the plan, the pruning transform and the model card."""
