"""Rollout backends: the interface (:mod:`.base`) and transformers ``generate`` (:mod:`.hf`)."""
