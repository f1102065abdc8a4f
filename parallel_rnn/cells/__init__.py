"""Recurrent cells with the `cell(input_t, state) -> new_state` signature."""
