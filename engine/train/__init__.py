"""Building the corpus and training the default model (dlm-corpus, dlm-train)."""
