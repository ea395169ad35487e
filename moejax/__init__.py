"""moejax: a small JAX trainer for DeepSeek-style Mixture-of-Experts language models."""
