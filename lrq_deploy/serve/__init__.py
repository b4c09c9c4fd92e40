"""Hand-offs to serving engines in the formats they read (Triton Inference Server model
repositories); heavy or optional libraries are imported lazily."""
