"""Talking to a model: chat templates, the REPL, conversation files and the chat evals."""
