"""napari dock widgets (Segment, Inspect features, Fine-tune)."""
