"""Overrides of configs/tiny.py for the tests that train, resume or distil for a few steps.

Nearly all of such a test's time is XLA compiling its programs (AE, DiT and distillation steps,
samplers), which grows with the layers traced, so these are the smallest models the checks
need: one DiT block of width 64, one text-encoder layer, and an AE of ResBlocks only, 32 wide.
Measured on the 2-core machine, alone: tests/test_training.py 164 s with 2 DiT blocks, 2 text
layers and the tiny config's EfficientViT AE -> 122 s with these (the same at 32 and 64 px).
"""
RESBLOCK_AE = {"ae.encoder_block_types": ["ResBlock"] * 4, "ae.decoder_block_types": ["ResBlock"] * 4,
               "ae.encoder_block_out_channels": [32] * 4, "ae.decoder_block_out_channels": [32] * 4}
SMALLEST_MODEL = {"model.depth": 1, "model.hidden_size": 64, "text.num_layers": 1, **RESBLOCK_AE}
