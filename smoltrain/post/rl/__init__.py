"""Reinforcement learning with verifiable rewards (GRPO): the stage, its loss, rollouts, rewards and prompts."""
