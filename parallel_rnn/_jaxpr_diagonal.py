"""The exact Jacobian diagonal of a generic cell from its jaxpr, in closed form.

A cell without `diagonal_jacobian` (a closure, a user's MLP) used to get
`diag ∂f/∂s` by `D` JVP passes. Most cells are a few matrix-vector products of
`s` (or of slices of it) wrapped in elementwise functions, and then the diagonal
is cheap: `diag(c) W e_i` only needs `W`'s diagonal. This module traces one step
of the flat cell `(x_t, (D,)) -> (D,)` to a jaxpr and interprets it, carrying
alongside every `s`-dependent 1-D intermediate `v` (size `m`) its Jacobian
`∂v/∂s` as a short sum of structured terms:

- `Sel(coef, idx)`: `J[j, idx[j]] += coef[j]` (`idx` static; `-1` = empty row).
  Identity, slices, concatenations, rolls and splits of `s`.
- `Mat(c, W, inner)`: `J = diag(c) W J_inner`, `W` independent of `s`, `J_inner`
  a `Sel` (depth 1: the gates `W_hh h` of a GRU/LSTM) or a depth-1 `Mat` (depth
  2: the MLP `s + W₂ tanh(W₁ s + U x)`).

Elementwise primitives scale the terms by their partials (from `jax.jvp` of the
primitive, which XLA fuses with the value), structural ones move rows, a matrix
product by an `s`-independent matrix adds a level, and call primitives (`jit`,
`custom_jvp_call`, …) are entered. Anything else with an `s`-dependent operand
(a product of two `s`-dependent matrices, reductions, sorting, loops, 2-D
intermediates, more than `_MAX_TERMS` terms, a third level) makes the analysis
give up; that decision is static (it depends on the jaxpr only), and the caller
then falls back to autodiff.

Under `jax.vmap` over time the weights are unbatched, so everything computed from
them alone (the gathered `W[j, idx⁻¹(j)]`, the depth-2 `W₂ ⊙ W₁ᵀ`) is computed once,
and what remains per step is elementwise work plus, at depth 2, one matvec.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree


# More terms than this per intermediate and the structured form stops paying
# (each term costs at least one `(D,)` elementwise pass at the end).
_MAX_TERMS = 16

# Set to False to force the `D`-JVP fallback (e.g. to benchmark it).
ENABLED = True


class _Unsupported(Exception):
    """The jaxpr holds something the structured form cannot represent."""


@dataclasses.dataclass(frozen=True)
class Sel:
    """`J[j, idx[j]] = coef[j]` for rows with `idx[j] >= 0`; `coef=None` means ones."""

    coef: Array | None  # (m,)
    idx: np.ndarray  # (m,) static ints, -1 = empty row


@dataclasses.dataclass(frozen=True)
class Mat:
    """`J = diag(c) W J_inner`; `c=None` means ones. `W` does not depend on `s`."""

    c: Array | None  # (m,)
    w: Array  # (m, n)
    inner: "Sel | Mat"  # (n, D)


Term = Sel | Mat


def _depth(term: Term) -> int:
    return 0 if isinstance(term, Sel) else 1 + _depth(term.inner)


def _mul(a: Array | None, b: Array) -> Array:
    return b if a is None else a * b


def _scale(term: Term, p: Array) -> Term:
    """`diag(p) J`."""
    if isinstance(term, Sel):
        return Sel(_mul(term.coef, p), term.idx)
    return Mat(_mul(term.c, p), term.w, term.inner)


def _gather_rows(a: Array, rows: np.ndarray) -> Array:
    """`a[rows]` along axis 0, zero where `rows < 0`.

    Slices, splits and concatenations give a contiguous run of rows padded with
    empty ones; a static slice and a pad of that are much cheaper than a gather."""
    live = np.nonzero(rows >= 0)[0]
    if len(live) == 0:
        return jnp.zeros((len(rows), *a.shape[1:]), a.dtype)
    first, last, start = int(live[0]), int(live[-1]) + 1, int(rows[live[0]])
    run = np.arange(start, start + len(live))
    if last - first == len(live) and np.array_equal(rows[first:last], run):
        piece = a[start : start + len(live)]
        if first == 0 and last == len(rows):
            return piece
        pad = [(int(first), int(len(rows) - last))] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(piece, pad)
    out = a[np.where(rows >= 0, rows, 0)]
    if len(live) < len(rows):
        mask = (rows >= 0).reshape(-1, *([1] * (a.ndim - 1)))
        out = jnp.where(mask, out, jnp.zeros((), a.dtype))
    return out


def _take_rows(term: Term, rows: np.ndarray) -> Term:
    """Row `r` of the result is row `rows[r]` of `term`, or empty where `rows[r] < 0`."""
    if isinstance(term, Sel):
        safe = np.where(rows >= 0, rows, 0)
        coef = None if term.coef is None else _gather_rows(term.coef, rows)
        return Sel(coef, np.where(rows >= 0, term.idx[safe], -1))
    # Empty rows get zero rows of W (s-free, so computed once), and zero `c`.
    c = None if term.c is None else _gather_rows(term.c, rows)
    return Mat(c, _gather_rows(term.w, rows), term.inner)


def _cast(term: Term, dtype: Any) -> Term:
    if isinstance(term, Sel):
        return Sel(None if term.coef is None else term.coef.astype(dtype), term.idx)
    c = None if term.c is None else term.c.astype(dtype)
    return Mat(c, term.w.astype(dtype), _cast(term.inner, dtype))


def _merge_sel(a: Sel, b: Sel, dtype: Any) -> Sel | None:
    """One `Sel` equal to `a + b`, when in every row they agree or one is empty."""
    la, lb = a.idx >= 0, b.idx >= 0
    if np.any(la & lb & (a.idx != b.idx)):
        return None
    if a.coef is None and b.coef is None and not (la & lb).any():
        coef = None  # disjoint identity pieces (a concatenation of slices of s)
    else:
        m, zero = a.idx.shape[0], jnp.zeros((), dtype)
        ca = jnp.ones((m,), dtype) if a.coef is None else a.coef.astype(dtype)
        cb = jnp.ones((m,), dtype) if b.coef is None else b.coef.astype(dtype)
        coef = jnp.where(la, ca, zero) + jnp.where(lb, cb, zero)
    return Sel(coef, np.where(la, a.idx, b.idx))


def _add(dtype: Any, *term_lists: Sequence[Term]) -> list[Term]:
    """The terms of a sum, with mergeable `Sel` terms combined."""
    out: list[Term] = []
    for terms in term_lists:
        for term in terms:
            if isinstance(term, Sel):
                for k, other in enumerate(out):
                    if isinstance(other, Sel):
                        merged = _merge_sel(other, term, dtype)
                        if merged is not None:
                            out[k] = merged
                            break
                else:
                    out.append(term)
            else:
                out.append(term)
    if len(out) > _MAX_TERMS:
        raise _Unsupported(f"more than {_MAX_TERMS} Jacobian terms")
    return out


def _matmul(a: Array, term: Term) -> Term:
    """`A J` for an `s`-independent `A` of shape `(p, m)`."""
    if isinstance(term, Mat) and term.c is None:
        return Mat(None, a @ term.w, term.inner)  # no nonlinearity between: fold
    if _depth(term) >= 2:
        raise _Unsupported("a third level of matrix products")
    return Mat(None, a, term)


# --- the diagonal of each term --------------------------------------------------


def _inverse(idx: np.ndarray, D: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`inv[j]` with `idx[inv[j]] == j` (and a mask of the `j` that have one), or
    `None` when some column is hit twice."""
    hits = idx[idx >= 0]
    if len(np.unique(hits)) != len(hits) or (len(hits) and hits.max() >= D):
        return None
    inv = np.full(D, -1)
    inv[idx[idx >= 0]] = np.nonzero(idx >= 0)[0]
    return np.where(inv >= 0, inv, 0), inv >= 0


def _sel_matrix(idx: np.ndarray, D: int) -> np.ndarray:
    """The `(n, D)` 0/1 matrix `S[l, j] = [idx[l] == j]`."""
    return (idx[:, None] == np.arange(D)[None, :]).astype(np.float64)


def _term_diagonal(term: Term, D: int, dtype: Any) -> Array:
    """`diag(J)[j]` for `j < D` of one term with `D` rows."""
    zero = jnp.zeros((), dtype)
    if isinstance(term, Sel):
        mask = term.idx == np.arange(D)
        coef = jnp.ones((D,), dtype) if term.coef is None else term.coef
        return jnp.where(mask, coef, zero)
    c = jnp.ones((D,), dtype) if term.c is None else term.c
    inner = term.inner
    if isinstance(inner, Sel):
        inv = _inverse(inner.idx, D)
        if inv is not None:  # one entry per column: gather W[j, inv[j]] (s-free)
            safe, live = inv
            wg = jnp.where(live, term.w[np.arange(D), safe], zero)
            cg = 1 if inner.coef is None else jnp.where(live, inner.coef[safe], zero)
            return c * wg * cg
        # Several rows of the inner term hit column j: Σ_k W[j,k] coef[k] [idx[k]=j].
        masked = term.w * _sel_matrix(inner.idx, D).T.astype(dtype)
        if inner.coef is None:
            return c * jnp.sum(masked, axis=1)
        return c * (masked @ inner.coef)
    # Depth 2: diag(c₂ W₂ diag(c₁) W₁ diag(c₀) S)[j] = c₂[j] c₀[inv j] ((W₂ ⊙ W₁[:, inv]ᵀ) @ c₁)[j]
    sel = inner.inner
    assert isinstance(sel, Sel)
    c1 = jnp.ones((inner.w.shape[0],), dtype) if inner.c is None else inner.c
    inv = _inverse(sel.idx, D)
    if inv is not None:
        safe, live = inv
        w1g = jnp.where(live[None, :], inner.w[:, safe], zero)  # (m1, D)
        c0 = 1 if sel.coef is None else jnp.where(live, sel.coef[safe], zero)
        return c * c0 * ((term.w * w1g.T) @ c1)
    if sel.coef is not None:
        raise _Unsupported("depth-2 term over a non-injective selection with coefficients")
    b = inner.w @ _sel_matrix(sel.idx, D).astype(dtype)  # (m1, D), s-free
    return c * ((term.w * b.T) @ c1)


# --- the interpreter ------------------------------------------------------------

_ELEMENTWISE = frozenset(
    """mul div exp exp2 log log1p expm1 tanh logistic integer_pow pow sqrt rsqrt cbrt
    max min abs select_n erf erfc erf_inv sin cos tan asin acos atan atan2 sinh cosh
    asinh acosh atanh square clamp rem lgamma digamma reduce_precision""".split()
)
# Outputs with zero derivative: no terms, whatever the inputs.
_ZERO_DERIVATIVE = frozenset("stop_gradient sign floor ceil round is_finite".split())
_IDENTITY = frozenset("copy copy_p optimization_barrier".split())
_CALLS = frozenset(
    "jit pjit closed_call core_call remat remat2 checkpoint custom_jvp_call "
    "custom_vjp_call custom_vjp_call_jaxpr".split()
)


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


class _Interpreter:
    """Evaluates a jaxpr while propagating the structured `∂v/∂s` of every value."""

    def __init__(self):
        self.vals: dict[Any, Any] = {}
        self.jacs: dict[Any, list[Term]] = {}

    def read(self, v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else self.vals[v]

    def jac(self, v: Any) -> list[Term] | None:
        return None if isinstance(v, jex.Literal) else self.jacs.get(v)

    def run(self, jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any], arg_jacs) -> tuple:
        for var, val in zip(jaxpr.constvars, consts):
            self.vals[var] = val
        for var, val, jac in zip(jaxpr.invars, args, arg_jacs):
            self.vals[var] = val
            if jac is not None:
                self.jacs[var] = jac
        for eqn in _live_eqns(jaxpr):
            self.eqn(eqn)
        return [self.read(v) for v in jaxpr.outvars], [self.jac(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any) -> None:
        ins = [self.read(v) for v in eqn.invars]
        in_jacs = [self.jac(v) for v in eqn.invars]
        name = eqn.primitive.name
        no_derivative = name in _ZERO_DERIVATIVE or not any(_is_float(v.aval) for v in eqn.outvars)
        if no_derivative or all(j is None for j in in_jacs):
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            # JAX before 0.9.1 gives `(subfuns, params)`, later versions the params alone.
            subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
            outs = eqn.primitive.bind(*subfuns, *ins, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            for var, val in zip(eqn.outvars, outs):
                self.vals[var] = val
            return
        if name in _CALLS:
            outs, out_jacs = self.call(eqn, ins, in_jacs)
        else:
            for var, jac in zip(eqn.invars, in_jacs):
                if jac is not None and len(var.aval.shape) > 1:
                    raise _Unsupported(f"{name} of a {var.aval.shape} s-dependent value")
            outs, out_jacs = _rule(eqn, ins, in_jacs)
        for var, val, jac in zip(eqn.outvars, outs, out_jacs):
            self.vals[var] = val
            # Integer and boolean results (comparisons, argmax) carry no derivative.
            if jac is not None and _is_float(var.aval):
                if len(var.aval.shape) > 1:
                    raise _Unsupported(f"{name} gives an s-dependent {var.aval.shape} value")
                self.jacs[var] = jac

    def call(self, eqn: Any, ins: list, in_jacs: list) -> tuple:
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(inner, jex.ClosedJaxpr):
            jaxpr, consts = inner.jaxpr, inner.consts
        elif isinstance(inner, jex.Jaxpr):
            jaxpr, consts = inner, []
        else:
            raise _Unsupported(f"call primitive {eqn.primitive.name} without a jaxpr")
        if len(jaxpr.invars) != len(ins):
            raise _Unsupported(f"{eqn.primitive.name} with hidden operands")
        # A custom JVP rule is replaced by the derivative of its primal function
        # (they differ only where the rule is a choice, e.g. relu at 0).
        return _Interpreter().run(jaxpr, consts, ins, in_jacs)


def _live_eqns(jaxpr: jex.Jaxpr) -> list:
    """The equations the outputs depend on (dead code may hold unsupported ops,
    e.g. a closed form that the cell computes and drops)."""
    live = {v for v in jaxpr.outvars if not isinstance(v, jex.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        # Effects (prints) not feeding the output are dropped: this pass computes
        # a derivative, it should not repeat the cell's side effects.
        if any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, jex.Literal))
    return kept[::-1]


def _unit(x: Array) -> Array:
    return jnp.ones(jnp.shape(x), x.dtype)


def _broadcast_rows(jac: list[Term], shape: tuple, out_shape: tuple) -> list[Term]:
    """Terms of an operand of `shape` broadcast to a 0-d/1-d `out_shape`."""
    if shape == out_shape:
        return jac
    if shape in ((), (1,)):
        m = out_shape[0] if out_shape else 1
        return [_take_rows(t, np.zeros(m, int)) for t in jac]
    raise _Unsupported(f"broadcast of {shape} to {out_shape}")


def _rule(eqn: Any, ins: list, in_jacs: list) -> tuple[list, list]:
    """Value and terms of the outputs of one non-call equation with `s`-dependent inputs."""
    name, params = eqn.primitive.name, eqn.params
    out_aval = eqn.outvars[0].aval
    out_shape: tuple[int, ...] = tuple(out_aval.shape)
    bind = lambda *args: eqn.primitive.bind(*args, **params)  # noqa: E731

    if len(out_shape) > 1:
        raise _Unsupported(f"{name} gives an s-dependent {out_shape} value")
    m = int(np.prod(out_shape))  # rows of the output's terms (1 for a scalar)

    def own(k):  # operand k's terms, broadcast to the output
        return _broadcast_rows(in_jacs[k], tuple(eqn.invars[k].aval.shape), out_shape)

    dep = [k for k, j in enumerate(in_jacs) if j is not None]

    minus_one = lambda: -jnp.ones(out_shape or (1,), out_aval.dtype)  # noqa: E731
    if name in ("add", "sub", "add_any"):
        terms = [own(k) for k in dep]
        if name == "sub" and 1 in dep:
            terms[-1] = [_scale(t, minus_one()) for t in terms[-1]]
        return [bind(*ins)], [_add(out_aval.dtype, *terms)]
    if name == "neg":
        return [bind(*ins)], [[_scale(t, minus_one()) for t in own(0)]]
    if name in _IDENTITY or (name == "convert_element_type" and _is_float(out_aval)):
        return [bind(*ins)], [[_cast(t, out_aval.dtype) for t in own(0)]]
    if name in _ELEMENTWISE:
        out, terms = None, []
        for k in dep:
            if not _is_float(eqn.invars[k].aval):
                continue

            def at_k(v, k=k):
                return bind(*ins[:k], v, *ins[k + 1 :])

            out, partial = jax.jvp(at_k, (ins[k],), (_unit(ins[k]),))
            p = jnp.reshape(partial, out_shape or (1,))
            terms.append([_scale(t, p) for t in own(k)])
        return [bind(*ins) if out is None else out], [_add(out_aval.dtype, *terms)]
    if name == "slice" and len(out_shape) == 1:
        (start,), (limit,) = params["start_indices"], params["limit_indices"]
        stride = (params["strides"] or (1,))[0]
        rows = np.arange(start, limit, stride)
        return [bind(*ins)], [[_take_rows(t, rows) for t in in_jacs[0]]]
    if name == "split" and params["axis"] == 0:
        outs, out_jacs, start = bind(*ins), [], 0
        for size in params["sizes"]:
            rows = np.arange(start, start + int(size))
            out_jacs.append([_take_rows(t, rows) for t in in_jacs[0]])
            start += int(size)
        return outs, out_jacs
    if name == "concatenate":
        sizes = [int(np.prod(v.aval.shape)) for v in eqn.invars]
        offsets = np.cumsum([0, *sizes])
        pieces = []
        for k in dep:
            rows = np.arange(m) - offsets[k]
            rows = np.where((rows >= 0) & (rows < sizes[k]), rows, -1)
            pieces.append([_take_rows(t, rows) for t in in_jacs[k]])
        return [bind(*ins)], [_add(out_aval.dtype, *pieces)]
    if name in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose"):
        # Only reshapes between (), (1,) and (m,) get here (2-D raised above); they
        # keep the row order, and a size-1 value may be broadcast to m rows.
        shape = tuple(eqn.invars[0].aval.shape)
        n_in = int(np.prod(shape))
        if n_in == int(np.prod(out_shape)):
            return [bind(*ins)], [in_jacs[0]]
        if n_in == 1:
            return [bind(*ins)], [_broadcast_rows(in_jacs[0], (), out_shape)]
    if name == "pad" and in_jacs[1] is None and len(out_shape) == 1:
        ((lo, _, interior),) = params["padding_config"]
        q = np.arange(m) - lo  # negative `lo`/`hi` crop
        n = eqn.invars[0].aval.shape[0]
        src = q // (interior + 1)
        rows = np.where((q >= 0) & (q % (interior + 1) == 0) & (src < n), src, -1)
        return [bind(*ins)], [[_take_rows(t, rows) for t in in_jacs[0]]]
    if name == "rev":
        return [bind(*ins)], [[_take_rows(t, np.arange(m)[::-1]) for t in in_jacs[0]]]
    if name == "dot_general" and len(dep) == 1:
        return [bind(*ins)], [_dot_general(eqn, ins, in_jacs, dep[0])]
    raise _Unsupported(f"primitive {name} on an s-dependent value")


def _dot_general(eqn: Any, ins: list, in_jacs: list, k: int) -> list[Term]:
    """`A v` with `v` the `s`-dependent 1-D operand `k` and `A` the other, 2-D one."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    other = ins[1 - k]
    if lb or rb or jnp.ndim(other) != 2 or len(eqn.invars[k].aval.shape) != 1:
        raise _Unsupported("dot_general other than a matrix times an s-dependent vector")
    contract = (lc if k == 1 else rc)[0]  # the matrix's contracted axis
    a = other if contract == 1 else other.T  # (p, m): out = a @ v
    dtype = eqn.outvars[0].aval.dtype
    return _add(dtype, [_matmul(a.astype(dtype), t) for t in in_jacs[k]])


# --- entry points ---------------------------------------------------------------


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def structured_value_and_diagonal(
    fn: Callable, x: PyTree, s: Float[Array, " D"]
) -> Callable[[PyTree, Float[Array, " D"]], tuple[Array, Array]] | None:
    """`(x_t, s) ↦ (fn(x_t, s), diag ∂fn/∂s)` in closed form, or `None` if not representable.

    `x` and `s` give the shapes of one step (only their shapes and dtypes are used).
    The returned function is to be `vmap`ped over time; the cell's weights enter
    as the traced jaxpr's constants, so they stay unbatched. `fn` maps `(D,)` to `(D,)`.
    """
    if not ENABLED:
        return None
    x_abs, s_abs = _abstract(x), _abstract(s)
    D = s_abs.shape[0]
    closed = jax.make_jaxpr(fn)(x_abs, s_abs)
    out_aval = closed.out_avals[0] if len(closed.out_avals) == 1 else None
    if out_aval is None or tuple(out_aval.shape) != (D,):
        return None

    def value_and_diagonal(x_t: PyTree, s_t: Array) -> tuple[Array, Array]:
        args = [*jax.tree_util.tree_leaves(x_t), s_t]
        arg_jacs = [None] * (len(args) - 1) + [[Sel(None, np.arange(D))]]
        (out,), (jac,) = _Interpreter().run(closed.jaxpr, closed.consts, args, arg_jacs)
        dtype = s_t.dtype
        diag = jnp.zeros((D,), dtype)
        for term in jac or []:
            diag = diag + _term_diagonal(_cast(term, dtype), D, dtype)
        return out.astype(dtype), diag

    try:
        jax.eval_shape(value_and_diagonal, x_abs, s_abs)
    except _Unsupported:
        return None
    return value_and_diagonal


def is_structured(fn: Callable, x: PyTree, s: Float[Array, " D"]) -> bool:
    """Whether `fn`'s diagonal is computed in closed form (else by `D` JVPs)."""
    return structured_value_and_diagonal(fn, x, s) is not None
