import jax


# Tests run with float64 available; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)
# Strict promotion, as in Optimistix/Lineax: an implicit rank broadcast or a
# mixed-dtype operation in the library is a bug that would silently upcast
# float32 states (or broadcast a wrong shape), so the tests make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
