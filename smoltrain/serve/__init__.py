"""Serving a model where people use models: an OpenAI-compatible HTTP API with continuous batching,
and a chat page at `/` (`smoltrain serve MODEL`)."""

from smoltrain.serve.app import build_app, serve

__all__ = ["build_app", "serve"]
