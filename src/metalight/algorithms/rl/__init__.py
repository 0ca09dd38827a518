"""Reinforcement learning's outer steps and the MAML-RL learners built on them: policy-gradient surrogates and GAE, TRPO, PPO (used by MAML-TRPO, MAML-PPO and RL²)."""
