"""Text for few-shot tasks: the tokenizer and pretrained token embeddings (WordLlama's, read offline), text readers and encoders."""
