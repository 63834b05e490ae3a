"""Integrations of the fused GRPO loss with other trainers.

* ``mgrpo_fast.integrations.trl``: ``FusedGRPOTrainer``, a drop-in subclass of TRL's ``GRPOTrainer``
  whose loss is ``fused_linear_grpo_loss`` on the last hidden states and ``lm_head.weight``.

Submodules import their trainer library lazily: importing this package never imports TRL.
"""
