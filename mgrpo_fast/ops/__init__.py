"""The public functional API and its implementations: log-probs, the GRPO loss, advantages, ``GRPOLoss``."""
