"""Pictures of a run: [CLS] self-attention maps (``python -m ibot_fast.viz.attention``) and the
training curves (loss terms, learning rate, teacher temperatures) written by the trainer."""
