"""Real-data accuracy benchmark: two-digit VQA canvases from scikit-learn digits."""
