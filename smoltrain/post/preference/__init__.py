"""Preference optimisation (DPO, APO, IPO): the stage, the losses, pairs (read, generated, prepared on disk)."""
