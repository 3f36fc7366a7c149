"""Pod readiness: TPU generation facts and ahead-of-time fit checks (`jaxlearn compile`)."""
