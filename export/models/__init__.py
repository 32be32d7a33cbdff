"""Model-family adapters: one small module per family, each giving the vision engine module
(pixel_values -> embeddings [B, T, H], positions [B, T]) and the facts the manifest records."""
