"""Supervised fine-tuning: the stage, its data (conversations -> tokens and loss targets) and the on-disk preparation."""
