"""RL training: rollouts, log-probs, checkpoints and the GRPO/TRACE training loop."""
