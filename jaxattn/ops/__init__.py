"""The math of jaxattn, once: pure functions over arrays and weight pytrees."""
