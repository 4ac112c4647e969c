"""Code both sides of easel import: job schema, settings, registry, storage, broker wiring."""
