"""Models: the zoo's ready layer groups, weights and the preprocessing they expect, fresh heads, the
user's own model class, Hugging Face transformers classifiers (hf), and build_model that joins them."""
