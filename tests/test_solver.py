"""The closed forms against brute force (torch.linalg.lstsq on the stacked problem)."""

from __future__ import annotations

import pytest
import torch

from iteris_core.baselines import ties_dense, trim
from iteris_core.errors import SolverError
from iteris_core.low_rank import LowRankDelta, factorize_exact, stack, truncate
from iteris_core.solver import (ConceptTerm, closed_form_dense, ridge, row_space_basis, solve_full,
                                solve_subspace)

torch.manual_seed(0)


def _problem(n_concepts=3, d=12, o=7, ranks=(2, 3, 1), tokens=(40, 25, 60), seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas, xs, xts = [], [], []
    for i in range(n_concepts):
        up = torch.randn(o, ranks[i], generator=g, dtype=torch.float64)
        down = torch.randn(ranks[i], d, generator=g, dtype=torch.float64)
        deltas.append(LowRankDelta(up, down, 0.5 + i))
        x = torch.randn(d, tokens[i], generator=g, dtype=torch.float64) * (1 + i)
        xs.append(x)
        xts.append(x + 0.3 * torch.randn(d, tokens[i], generator=g, dtype=torch.float64))
    weights = [0.7, 1.3, 2.0][:n_concepts]
    return deltas, xs, xts, weights


def brute_force(deltas, xs, xts, weights, a):
    """Solve min_D sum_i lam_i [||D Xt - dW X||^2 / n + a||K|| ||D - (|C|/|K|) dW||^2] by lstsq."""
    rows, targets = [], []
    for delta, x, xt, lam in zip(deltas, xs, xts, weights):
        dw = delta.dense().double()
        n = x.shape[1]
        k_norm = float(torch.linalg.matrix_norm(xt @ xt.T / n))
        c_norm = float(torch.linalg.matrix_norm(x @ xt.T / n))
        rows.append((lam / n) ** 0.5 * xt.T)
        targets.append((lam / n) ** 0.5 * (dw @ x).T)
        if a > 0:
            w = (lam * a * k_norm) ** 0.5
            rows.append(w * torch.eye(x.shape[0], dtype=torch.float64))
            targets.append(w * (c_norm / k_norm) * dw.T)
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution
    return solution.T


@pytest.mark.parametrize("a", [0.0, 1e-4, 1e-2])
def test_closed_form_equals_lstsq(a):
    deltas, xs, xts, weights = _problem()
    dense = closed_form_dense([d.dense().double() for d in deltas], xs, xts, weights, a)
    expected = brute_force(deltas, xs, xts, weights, a)
    assert torch.allclose(dense, expected, rtol=1e-8, atol=1e-10)


def _terms_and_system(deltas, xs, xts, weights, a):
    system = torch.zeros(xs[0].shape[0], xs[0].shape[0], dtype=torch.float64)
    terms = []
    for delta, x, xt, lam in zip(deltas, xs, xts, weights):
        n = x.shape[1]
        k, c = xt @ xt.T / n, x @ xt.T / n
        system += lam * ridge(k, a)
        terms.append(ConceptTerm(delta, lam, delta.down @ c, float(torch.linalg.matrix_norm(c))))
    return terms, system


@pytest.mark.parametrize("a", [1e-5, 1e-3])
def test_exact_low_rank_form_equals_dense_solution(a):
    deltas, xs, xts, weights = _problem()
    terms, system = _terms_and_system(deltas, xs, xts, weights, a)
    merged = solve_full(system, terms, a, "layer")
    assert merged.rank == sum(d.rank for d in deltas)          # up matrices kept, rank = sum r_i
    for i, d in enumerate(deltas):                              # ... and they really are the B_i
        start = sum(x.rank for x in deltas[:i])
        assert torch.allclose(merged.up[:, start:start + d.rank], d.up.float())
    expected = brute_force(deltas, xs, xts, weights, a)
    assert torch.allclose(merged.dense().double(), expected, rtol=1e-4, atol=1e-5)


def test_single_lora_is_reproduced_exactly():
    deltas, xs, _, _ = _problem(n_concepts=1, ranks=(3,), tokens=(30,))
    terms, system = _terms_and_system(deltas, xs, xs, [1.7], 1e-4)
    merged = solve_full(system, terms, 1e-4, "layer")
    assert torch.allclose(merged.dense(), deltas[0].dense().float(), rtol=1e-5, atol=1e-6)


def test_row_space_solution_is_the_restricted_least_squares():
    deltas, xs, xts, weights = _problem()
    a = 1e-3
    basis = row_space_basis(deltas).double()
    r = basis.shape[0]
    assert r == sum(d.rank for d in deltas)
    # projected statistics, exact norms
    system = torch.zeros(r, r, dtype=torch.float64)
    rhs = torch.zeros(deltas[0].out_features, r, dtype=torch.float64)
    for delta, x, xt, lam in zip(deltas, xs, xts, weights):
        n = x.shape[1]
        k, c = xt @ xt.T / n, x @ xt.T / n
        k_hat, c_hat = basis @ k @ basis.T, basis @ c @ basis.T
        system += lam * (k_hat + a * float(torch.linalg.matrix_norm(k)) * torch.eye(r, dtype=torch.float64))
        coords = delta.down @ basis.T
        rhs += delta.scale * lam * (delta.up @ coords) @ (c_hat + a * float(torch.linalg.matrix_norm(c)) *
                                                          torch.eye(r, dtype=torch.float64))
    merged = solve_subspace(system, rhs, basis, "layer")
    # brute force over D = U Q: unknown U^T (r x o), rows Q Xt etc.
    rows, targets = [], []
    for delta, x, xt, lam in zip(deltas, xs, xts, weights):
        n = x.shape[1]
        dw = delta.dense().double()
        k_norm = float(torch.linalg.matrix_norm(xt @ xt.T / n))
        c_norm = float(torch.linalg.matrix_norm(x @ xt.T / n))
        rows.append((lam / n) ** 0.5 * (basis @ xt).T)
        targets.append((lam / n) ** 0.5 * (dw @ x).T)
        w = (lam * a * k_norm) ** 0.5
        rows.append(w * torch.eye(r, dtype=torch.float64))
        targets.append(w * (c_norm / k_norm) * (dw @ basis.T).T)
    u = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    assert torch.allclose(merged.dense().double(), u @ basis, rtol=1e-4, atol=1e-5)


def test_singular_system_names_the_layer():
    deltas, xs, _, _ = _problem(n_concepts=1, ranks=(2,), tokens=(3,))   # 3 tokens, d = 12, no ridge
    terms, system = _terms_and_system(deltas, xs, xs, [1.0], 0.0)
    with pytest.raises(SolverError, match="unet.some.layer.*singular.*regularisation"):
        solve_full(system, terms, 0.0, "unet.some.layer")


def test_non_finite_statistics_are_refused():
    deltas, xs, _, _ = _problem(n_concepts=1, ranks=(2,), tokens=(30,))
    terms, system = _terms_and_system(deltas, xs, xs, [1.0], 1e-4)
    system[0, 0] = float("nan")
    with pytest.raises(SolverError, match="NaN"):
        solve_full(system, terms, 1e-4, "x")


def test_factorize_exact_and_truncate_match_svd():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(20, 6, generator=g) @ torch.randn(6, 30, generator=g)
    factors = factorize_exact(dense)
    assert factors.rank == 6
    assert torch.allclose(factors.dense(), dense, rtol=1e-5, atol=1e-5)
    assert factorize_exact(torch.zeros(5, 5)) is None
    cut = truncate(factors, 2)
    s = torch.linalg.svdvals(dense.double())
    expected_error = float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert cut.delta.rank == 2
    assert abs(cut.relative_error - expected_error) < 1e-6
    actual = float((cut.delta.dense() - dense).norm() / dense.norm())
    assert abs(actual - expected_error) < 1e-5
    assert truncate(factors, 10).relative_error == 0.0


def test_stack_is_the_sum_of_deltas():
    a = LowRankDelta(torch.randn(5, 2), torch.randn(2, 4), 0.5)
    b = LowRankDelta(torch.randn(5, 3), torch.randn(3, 4), 2.0)
    assert torch.allclose(stack([a, b]).dense(), a.dense() + b.dense(), atol=1e-6)
    assert abs(a.frobenius_sq() - float(a.dense().pow(2).sum())) < 1e-4


def test_ties_by_hand():
    x = torch.tensor([[1.0, -2.0], [0.1, 4.0]])
    y = torch.tensor([[3.0, 1.0], [-0.2, -1.0]])
    assert torch.equal(trim(x, 0.5), torch.tensor([[0.0, -2.0], [0.0, 4.0]]))
    # trimmed: x -> [[0,-2],[0,4]], y -> [[3,0],[0,-1]]; signs: [+, -], [0 -> none, +]
    merged = ties_dense([x, y], 0.5)
    assert torch.allclose(merged, torch.tensor([[3.0, -2.0], [0.0, 4.0]]))
    assert torch.equal(ties_dense([x], 1.0), x)


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_packed_triangles_round_trip(size):
    from iteris_core.symmetric import Triangle

    g = torch.Generator().manual_seed(size)
    x = torch.randn(size, 3 * size, generator=g)
    gram = x @ x.T
    tri = Triangle.build(size, torch.device("cpu"))
    packed = tri.pack(gram)
    assert packed.numel() == size * (size + 1) // 2
    assert torch.allclose(tri.unpack_upper(packed).triu(), gram.triu())
    assert tri.frobenius(packed) == pytest.approx(float(torch.linalg.matrix_norm(gram)), rel=1e-5)
    bumped = tri.unpack_upper(tri.add_to_diagonal(packed.clone(), 2.5))
    assert torch.allclose(bumped.triu(), (gram + 2.5 * torch.eye(size)).triu())
    # only the upper triangle is read: whatever is below the diagonal does not change the packing
    scrambled = gram.triu() + torch.randn(size, size, generator=g).tril(-1)
    assert torch.equal(tri.pack(scrambled), packed)
    # unpacking into a given matrix writes the upper triangle and returns that matrix
    out = torch.full((size, size), float("nan"))
    assert tri.unpack_upper(packed, out=out) is out and torch.equal(out.triu(), tri.unpack_upper(packed).triu())


@pytest.mark.parametrize("size,tokens", [(1, 5), (3, 4), (13, 30), (64, 10)])
def test_upper_gram_accumulation_matches_the_full_product(size, tokens):
    from iteris_core.symmetric import add_upper_gram_, upper_gram_frobenius

    g = torch.Generator().manual_seed(size)
    batches = [torch.randn(tokens, size, generator=g, dtype=torch.float64) for _ in range(3)]
    accumulator = torch.full((size, size), float("nan"), dtype=torch.float64)   # a reused buffer: any contents
    for i, batch in enumerate(batches):
        add_upper_gram_(accumulator, batch, first=i == 0)
    stacked = torch.cat(batches)
    full = stacked.T @ stacked
    assert torch.allclose(accumulator.triu(), full.triu(), rtol=1e-12, atol=1e-10)
    assert upper_gram_frobenius(accumulator) == pytest.approx(float(torch.linalg.matrix_norm(full)), rel=1e-12)


def test_solver_reads_only_the_upper_triangle():
    deltas, xs, xts, weights = _problem()
    terms, system = _terms_and_system(deltas, xs, xts, weights, 1e-4)
    expected = solve_full(system, terms, 1e-4, "layer").dense()
    scrambled = system.triu() + torch.randn(system.shape, dtype=system.dtype).tril(-1) * 1e3
    assert torch.allclose(solve_full(scrambled, terms, 1e-4, "layer").dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("where", [(0, 0), (0, 5), (11, 11)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_systems_are_refused_wherever_the_value_is(where, value):
    deltas, xs, _, _ = _problem(n_concepts=1, ranks=(2,), tokens=(30,))
    terms, system = _terms_and_system(deltas, xs, xs, [1.0], 1e-4)
    system[where] = value
    with pytest.raises(SolverError, match="layer x.*NaN or infinite"):
        solve_full(system, terms, 1e-4, "layer x")


def test_matrix_pool_reuses_what_it_is_given():
    from iteris_core.buffers import MatrixPool

    pool = MatrixPool()
    first = pool.zeros((4, 4), "cpu")
    assert not first.any()
    pool.give(first.fill_(3.0))
    assert pool.nbytes == 64
    again = pool.zeros((4, 4), "cpu")
    assert again.data_ptr() == first.data_ptr() and not again.any()
    column_major = pool.take((5, 5), "cpu").mT        # a Cholesky factor's layout
    pool.give(column_major)
    assert pool.take((5, 5), "cpu").data_ptr() == column_major.data_ptr()
    assert pool.take((4, 4), "cpu", torch.float64).dtype == torch.float64   # keyed by dtype too
    pool.clear()
    assert pool.nbytes == 0


@pytest.mark.parametrize("tokens", [(3, 4, 2), (1, 1, 1)])
def test_token_space_solution_equals_the_full_system(tokens):
    from iteris_core.solver import TokenTerm, solve_token_space

    d, a = 12, 1e-3
    deltas, xs, xts, weights = _problem(tokens=tokens)
    expected = closed_form_dense([t.dense().double() for t in deltas], xs, xts, weights, a)
    blocks, sizes, token_weights, shift, terms = [], [], [], 0.0, []
    for j, (delta, x, xt, lam) in enumerate(zip(deltas, xs, xts, weights)):
        n = x.shape[1]
        k_norm = float(torch.linalg.matrix_norm(xt @ xt.T / n))
        c_norm = float(torch.linalg.matrix_norm(x @ xt.T / n))
        blocks.append(xt.T.float())
        sizes.append(n)
        token_weights.append(lam / n)
        shift += lam * a * k_norm
        terms.append(TokenTerm(delta, lam, (delta.down.double() @ x / n).float(), c_norm, j))
    stacked = torch.cat(blocks)
    assert stacked.shape[0] < d   # fewer tokens than the width: the case token space is for
    merged = solve_token_space(stacked, sizes, token_weights, shift, stacked @ stacked.T, terms, a, "layer")
    assert torch.allclose(merged.dense().double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
