"""The algorithm: rollouts, rewards and scoring, the MGRPO layers, the update, the trainer, evaluation."""
