import jax


# Tests run with float64 available; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)
