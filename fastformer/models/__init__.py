"""fastformer.models: complete models built from fastformer.nn."""
