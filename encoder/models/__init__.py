"""Model families and their parts, one file each: layers, vit, decoder, text (towers); ov2, ov1, clip (families);
registry (the table family -> model class, losses)."""

from encoder.models.registry import FAMILIES, build_losses, build_model, get_family, text_inputs

__all__ = ["FAMILIES", "build_losses", "build_model", "get_family", "text_inputs"]
