"""Data: embedded corpus, tokenizer, token shards, and the packed, shuffled, mixed training stream.

Entry points: `loader.build_train_loader`, `loader.validation_batches`, `embedded.ensure_embedded_data`,
`tokenizer.load_tokenizer`, `stages.stage_at`.
"""
