"""`smoltrain demo`: the chain of stages (chain.py), the post-training recipes, pairs, merge and row
evaluations it composes (post.py), and its one report (report.py)."""

from smoltrain.demo.chain import demo

__all__ = ["demo"]
