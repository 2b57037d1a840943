"""Step caching (First-Block Cache, TeaCache-style) for any DiT, with every rank deciding alike."""
