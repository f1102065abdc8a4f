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
primitive, which XLA fuses with the value); a selection (`jnp.where`, `jnp.clip`)
empties the rows it does not select exactly, so that the other branch's
derivative does not enter even where it is NaN (as in forward-mode AD).
Structural primitives move rows, a matrix product by an `s`-independent matrix
adds a level, and call primitives (`jit`, `remat`, …) are entered. Elementwise
`jax.custom_jvp` and `jax.custom_vjp` functions are differentiated by their own
rule. Anything else with an `s`-dependent operand (a product of two
`s`-dependent matrices, reductions, sorting, loops, 2-D intermediates, a custom
rule on a non-elementwise function, more than `_MAX_TERMS` terms, a third
level), and any error met while analysing, makes the analysis give up; that
decision is static (it depends on the jaxpr only), and the caller then falls
back to autodiff.

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
    """`J = diag(c) W J_inner`; `c=None` means ones. `W` does not depend on `s`.

    `masked`: some rows were emptied by a selection (`c = 0` there), and must stay
    empty even where `W J_inner` is not finite."""

    c: Array | None  # (m,)
    w: Array  # (m, n)
    inner: "Sel | Mat"  # (n, D)
    masked: bool = False


Term = Sel | Mat


def _depth(term: Term) -> int:
    return 0 if isinstance(term, Sel) else 1 + _depth(term.inner)


def _mul(a: Array | None, b: Array) -> Array:
    return b if a is None else a * b


def _select(p: Array, a: Array | None) -> Array:
    """`p · a` with `0 · a = 0` even where `a` is not finite (`a=None` means ones)."""
    if a is None:
        return p
    return jnp.where(p == 0, jnp.zeros((), p.dtype), p * a)


def _scale(term: Term, p: Array, *, hard_zeros: bool = False) -> Term:
    """`diag(p) J`. With `hard_zeros` (a selection: `p` is 0 or 1), rows where
    `p == 0` become exactly empty.

    Forward-mode AD drops the tangent of the branch `jnp.where` does not select,
    and so must the analysis: that branch's partials may be `inf` or NaN (`sin(s)/s`
    at `s = 0`), and `0 · NaN` is NaN. Only selections pay for the `where`: after
    any other primitive a NaN partial is NaN in forward mode too."""
    scale = (lambda a: _select(p, a)) if hard_zeros else (lambda a: _mul(a, p))
    if isinstance(term, Sel):
        return Sel(scale(term.coef), term.idx)
    return Mat(scale(term.c), term.w, term.inner, term.masked or hard_zeros)


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
    return Mat(c, _gather_rows(term.w, rows), term.inner, term.masked)


def _cast(term: Term, dtype: Any) -> Term:
    if isinstance(term, Sel):
        return Sel(None if term.coef is None else term.coef.astype(dtype), term.idx)
    c = None if term.c is None else term.c.astype(dtype)
    return Mat(c, term.w.astype(dtype), _cast(term.inner, dtype), term.masked)


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
    # A row emptied by a `jnp.where` (c = 0) stays empty whatever lies below it.
    c = term.c
    if c is None:
        outer = lambda a: a  # noqa: E731
    elif term.masked:
        outer = lambda a: _select(c, a)  # noqa: E731
    else:
        outer = lambda a: c * a  # noqa: E731
    inner = term.inner
    if isinstance(inner, Sel):
        inv = _inverse(inner.idx, D)
        if inv is not None:  # one entry per column: gather W[j, inv[j]] (s-free)
            safe, live = inv
            wg = jnp.where(live, term.w[np.arange(D), safe], zero)
            cg = 1 if inner.coef is None else jnp.where(live, inner.coef[safe], zero)
            return outer(wg * cg)
        # Several rows of the inner term hit column j: Σ_k W[j,k] coef[k] [idx[k]=j].
        masked = term.w * _sel_matrix(inner.idx, D).T.astype(dtype)
        if inner.coef is None:
            return outer(jnp.sum(masked, axis=1))
        return outer(masked @ inner.coef)
    # Depth 2: diag(c₂ W₂ diag(c₁) W₁ diag(c₀) S)[j] = c₂[j] c₀[inv j] ((W₂ ⊙ W₁[:, inv]ᵀ) @ c₁)[j]
    sel = inner.inner
    assert isinstance(sel, Sel)
    c1 = jnp.ones((inner.w.shape[0],), dtype) if inner.c is None else inner.c
    inv = _inverse(sel.idx, D)
    if inv is not None:
        safe, live = inv
        w1g = jnp.where(live[None, :], inner.w[:, safe], zero)  # (m1, D)
        c0 = 1 if sel.coef is None else jnp.where(live, sel.coef[safe], zero)
        return outer(c0 * ((term.w * w1g.T) @ c1))
    if sel.coef is not None:
        raise _Unsupported("depth-2 term over a non-injective selection with coefficients")
    b = inner.w @ _sel_matrix(sel.idx, D).astype(dtype)  # (m1, D), s-free
    return outer((term.w * b.T) @ c1)


# --- the interpreter ------------------------------------------------------------

_ELEMENTWISE = frozenset(
    """mul div exp exp2 log log1p expm1 tanh logistic integer_pow pow sqrt rsqrt cbrt
    max min abs select_n erf erfc erf_inv sin cos tan asin acos atan atan2 sinh cosh
    asinh acosh atanh square clamp rem lgamma digamma reduce_precision""".split()
)
# Elementwise primitives whose derivative picks an operand (forward mode selects
# the tangent, so the other operands' tangents never enter, NaN or not).
_SELECTIONS = frozenset("select_n clamp".split())
# Outputs with zero derivative: no terms, whatever the inputs.
_ZERO_DERIVATIVE = frozenset("stop_gradient sign floor ceil round is_finite".split())
_IDENTITY = frozenset("copy copy_p".split())
# Functions with their own derivative rule: the rule is used, not the primal's derivative.
_CUSTOM_CALLS = frozenset("custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr".split())
_CALLS = _CUSTOM_CALLS | frozenset("jit pjit closed_call core_call remat remat2 checkpoint".split())


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
        if eqn.primitive.name in _CUSTOM_CALLS:
            return _custom_call(eqn, jaxpr, consts, ins, in_jacs)
        return _Interpreter().run(jaxpr, consts, ins, in_jacs)


def _custom_call(eqn: Any, jaxpr: jex.Jaxpr, consts: Sequence, ins: list, in_jacs: list):
    """A `jax.custom_jvp` or `jax.custom_vjp` function, differentiated by its own rule.

    The rule, not the primal, defines the derivative (a safe `sqrt` whose rule is 0
    where the primal's is `inf`). Only elementwise functions are supported: the
    primal's jaxpr, analysed with respect to each `s`-dependent operand alone, must
    give row `i` of every output a derivative from row `i` of that operand only.
    The partials are then one JVP of the rule per operand with unit tangents (for
    `custom_vjp`: one VJP per output with unit cotangents, the diagonal of the
    rule's Jacobian being the same read either way).
    """
    name = eqn.primitive.name
    dep = [k for k, j in enumerate(in_jacs) if j is not None]
    shapes = [tuple(eqn.invars[k].aval.shape) for k in dep]
    if not all(_is_float(v.aval) for v in eqn.outvars) or any(
        len(shape) > 1 or tuple(v.aval.shape) != shape for shape in shapes for v in eqn.outvars
    ):
        raise _Unsupported(f"{name} other than an elementwise function of 0-d/1-d values")
    for k, shape in zip(dep, shapes):
        probe: list = [None] * len(ins)
        probe[k] = [Sel(None, np.arange(int(np.prod(shape))))]
        found: list = []
        # Only the static row structure is wanted: trace it abstractly, once.
        jax.eval_shape(
            lambda *a, probe=probe: found.append(
                _Interpreter().run(jaxpr, consts, list(a), probe)[1]
            ),
            *ins,
        )
        for terms in found[0]:
            if terms and not (
                len(terms) == 1
                and isinstance(terms[0], Sel)
                and np.array_equal(terms[0].idx, probe[k][0].idx)
            ):
                raise _Unsupported(f"{name} of a function that is not elementwise")

    def bind(*args):
        return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))

    outs = bind(*ins)
    out_terms: list[list[list[Term]]] = [[] for _ in outs]
    for k in dep:

        def at_k(v, k=k):
            return bind(*ins[:k], v, *ins[k + 1 :])

        if name == "custom_jvp_call":
            partials = jax.jvp(at_k, (ins[k],), (_unit(ins[k]),))[1]
        else:
            _, vjp = jax.vjp(at_k, ins[k])
            zeros = [jnp.zeros_like(o) for o in outs]
            partials = [
                vjp([_unit(o) if i == j else z for j, z in enumerate(zeros)])[0]
                for i, o in enumerate(outs)
            ]
        for o, p in enumerate(partials):
            p = jnp.reshape(p, (-1,))
            out_terms[o].append([_scale(t, p, hard_zeros=True) for t in in_jacs[k]])
    dtypes = [v.aval.dtype for v in eqn.outvars]
    return outs, [_add(dtype, *terms) for dtype, terms in zip(dtypes, out_terms)]


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

    if name == "optimization_barrier":  # the identity on several operands
        return bind(*ins), [None if j is None else list(j) for j in in_jacs]
    if eqn.primitive.multiple_results and name != "split":
        raise _Unsupported(f"primitive {name} with several results")
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
            terms.append([_scale(t, p, hard_zeros=name in _SELECTIONS) for t in own(k)])
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
    try:
        closed = jax.make_jaxpr(fn)(x_abs, s_abs)
    except Exception:  # e.g. a cell that cannot be traced alone; the fallback will say
        return None
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

    # Trace it here, alone and batched as the solvers call it, so that whatever the
    # analysis cannot handle surfaces now: not only `_Unsupported` but any error of
    # a primitive it meets (an unexpected parameter, a rule that fails) means the
    # caller falls back to JVPs instead of failing the solve.
    batch = lambda a: jax.ShapeDtypeStruct((2, *a.shape), a.dtype)  # noqa: E731
    try:
        jax.eval_shape(value_and_diagonal, x_abs, s_abs)
        jax.eval_shape(jax.vmap(value_and_diagonal), *jax.tree_util.tree_map(batch, (x_abs, s_abs)))
    except Exception:
        return None
    return value_and_diagonal


def is_structured(fn: Callable, x: PyTree, s: Float[Array, " D"]) -> bool:
    """Whether `fn`'s diagonal is computed in closed form (else by `D` JVPs)."""
    return structured_value_and_diagonal(fn, x, s) is not None
