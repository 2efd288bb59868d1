"""What tests, demos and device checks build on: tiny models laid out like the real downloads, their
tokenizers, the demo tower, and recorders for call order and host syncs."""
