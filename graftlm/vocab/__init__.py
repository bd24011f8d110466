"""Vocabulary extension: a target-language tokenizer merged into the base (extend.py), the embeddings grown and the
new rows initialised (init.py), and the `vocab` stage that writes runs/<name>/vocab/ (stage.py).

For training: `vocab_rows(model_dir)` says which embedding rows an extended model added (None for any other model),
`embedding_weights(model)` gives the embedding and head parameters, `train_only_rows(model, rows)` masks the
gradient of every other row.
"""

from graftlm.vocab.init import VocabRows, embedding_weights, train_only_rows, vocab_rows

__all__ = ["VocabRows", "embedding_weights", "train_only_rows", "vocab_rows"]
