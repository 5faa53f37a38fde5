"""Training and evaluation data: chat templates, tokenisation with audio placeholders, labels."""
