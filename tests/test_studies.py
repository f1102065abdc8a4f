"""Each study runs end to end in its smallest mode and writes a non-empty CSV and PNG."""

import csv
import importlib

import jax
import pytest


pytestmark = pytest.mark.study


def _run(module_name, tmp_path, *extra, plots=True):
    module = importlib.import_module(f"experiments.{module_name}")
    # Studies are user code (Optax mixes Python floats with integer step counts):
    # standard promotion there; the library itself is checked strictly elsewhere.
    with jax.numpy_dtype_promotion("standard"):
        rows = module.main(["--smoke", "--out", str(tmp_path), *extra])
    assert rows
    csvs, pngs = list(tmp_path.glob("*.csv")), list(tmp_path.glob("*.png"))
    assert csvs and (pngs or not plots)
    for path in csvs + pngs:
        assert path.stat().st_size > 0
    return rows, csvs


def test_timing_smoke_writes_rows_for_sequential_and_solvers(tmp_path):
    rows, (path,) = _run("timing", tmp_path)
    methods = {r["solver"] for r in rows}
    assert {"sequential", "DEER", "QuasiDEER"} <= methods
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r in rows:
        assert r["status"] == "ok"
        if r["solver"] != "sequential":
            # float32 solves that converged agree with lax.scan.
            assert r["converged"] and r["max_abs_err"] < 1e-4


def test_timing_records_skipped_dense_solver_instead_of_running_it(tmp_path):
    rows, _ = _run("timing", tmp_path, "--max-bytes", "1")
    (deer,) = [r for r in rows if r["solver"] == "DEER"]
    assert deer["status"] == "skipped"
    assert any(r["solver"] == "QuasiDEER" and r["status"] == "ok" for r in rows)


def test_predictability_smoke_counts_iterations_and_lle(tmp_path):
    rows, _ = _run("predictability", tmp_path)
    for r in rows:
        assert r["converged"] and 1 <= r["num_steps"] <= r["T"]
    small = min(rows, key=lambda r: r["gain"])
    assert small["lle"] < 0  # gain 0.5 is contractive


# The other studies: each must offer a seconds-long `--smoke` mode. A smoke run checks
# the study's plumbing, not the solvers (tests/test_solve.py does): where a study
# takes `--solvers`, one dense and one diagonal solver (or the fewest the study
# compares) stand for all of them, since every further solver is one more compile.
OTHER_STUDIES = {
    "convergence": ("--solvers", "DEER", "QuasiDEER"),
    "quickstart": ("--solvers", "DEER", "QuasiDEER"),
    "train": ("--solvers", "QuasiDEER"),  # and BPTT, always
    "grad_memory": ("--solvers", "BPTT", "QuasiDEER"),
    "bench_solvers": (),  # its smoke mode runs DEER and QuasiDEER
}


@pytest.mark.parametrize("name", OTHER_STUDIES)
def test_other_study_smoke(name, tmp_path):
    _run(name, tmp_path, *OTHER_STUDIES[name])


def test_shooting_studies_smoke_converge_with_low_rank_and_beside_the_probe(tmp_path):
    rows, _ = _run("chunk_rank", tmp_path / "rank")
    assert {r["rank"] for r in rows} == {"exact", 2}
    for r in rows:
        assert r["converged"] and r["max_abs_err"] < 1e-4
        assert r["sv_gt_0.1"] <= r["sv_gt_0.01"] <= r["sv_gt_0.001"] <= r["D"]
    (row,) = _run("shooting_probe", tmp_path / "probe")[0]
    assert row["probe_status"] == "converged" and row["ms_converged"]
    assert row["ms_max_abs_err"] < 1e-4


def test_soak_smoke_compiles_every_case_without_error(tmp_path):
    rows, _ = _run("soak", tmp_path)
    assert all(r["status"] == "ok" for r in rows), rows
    # float64, default tolerance 1e-10: states and gradients against lax.scan's
    assert all(r["max_abs_err"] <= 1e-8 * max(1.0, r["ref_scale"]) for r in rows), rows


def test_bench_diagonal_smoke_writes_tables_and_plot(tmp_path):
    _run("bench_diagonal", tmp_path)


def test_log_plots_drop_non_finite_and_zero_residuals():
    from experiments._common import positive

    xs, ys = positive([1, 2, 3, 4, 5], [1.0, float("inf"), 0.0, float("nan"), 1e-3])
    assert xs.tolist() == [1.0, 5.0] and ys.tolist() == [1.0, 1e-3]


def test_study_options_reject_unknown_solver():
    from experiments._common import parse, study_parser

    with pytest.raises(SystemExit):
        parse(study_parser("x"), ["--solvers", "Newton"])
    args = parse(study_parser("x"), ["--quick", "--T", "1e3", "2000"])
    assert args.mode == "quick" and args.T == [1000, 2000]


def test_stress_smoke_solves_both_cases(tmp_path):
    rows, _ = _run("stress", tmp_path)
    assert {r["case"] for r in rows} == {"long", "batch"}
    for r in rows:
        assert r["status"] == "ok" and r["max_abs_err"] < 1e-4 and r["compiled_MiB"] > 0


def test_trained_rnn_smoke_measures_solvers_and_matching_training_curves(tmp_path):
    rows, _ = _run("trained_rnn", tmp_path)
    labels = {r["solver"] for r in rows}
    assert labels == {"DEER", "ELK(damping=0.0001)", "QuasiELK(damping=0.0001)"}
    for r in rows:
        assert r["converged"] and 1 <= r["iterations"] <= r["T"] and r["max_abs_err"] < 1e-3
    with open(tmp_path / "trained_rnn_training.csv") as f:
        training = list(csv.DictReader(f))
    # Exact gradients through solve_parallel train like BPTT.
    for r in training:
        assert abs(float(r["loss_bptt"]) - float(r["loss_parallel"])) < 1e-4
    assert (tmp_path / "trained_rnn_errors.csv").stat().st_size > 0


def test_trained_lm_smoke_measures_solvers_and_extra_configurations(tmp_path):
    rows, _ = _run("trained_lm", tmp_path, "--extra", "QuasiELK(damping=0.1)")
    assert {r["solver"] for r in rows} == {"QuasiDEER", "Jacobi", "QuasiELK(damping=0.1)"}
    for r in rows:
        assert r["converged"] and r["max_abs_err"] < 1e-3 and r["lle"] < 0


SHARED_OPTIONS = ("--quick", "--T", "--D", "--solvers", "--dtype", "--seed", "--reps", "--device")


def _readme_option_table() -> dict[str, set[str]]:
    """`{study: {options}}` from the per-study table of experiments/README.md."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "experiments" / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| study |"))
    options = [c.strip().strip("`") for c in header.strip("|").split("|")][1:]
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == len(options) + 1:
            table[cells[0].strip("`")] = {o for o, c in zip(options, cells[1:]) if c}
    return table


def _exit_code(module, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    return exit_info.value.code or 0, capsys.readouterr().out


def test_readme_option_table_matches_each_study_and_sizes_parse_1e4(capsys, monkeypatch):
    import re

    # `experiments.scaling` sets XLA_FLAGS on import unless set: keep this process's.
    monkeypatch.setenv("XLA_FLAGS", __import__("os").environ.get("XLA_FLAGS", ""))
    table = _readme_option_table()
    assert len(table) >= 16
    for name, documented in table.items():
        module = importlib.import_module(f"experiments.{name}")
        code, help_text = _exit_code(module, ["--help"], capsys)
        assert code == 0
        taken = {o for o in (*SHARED_OPTIONS, "--out") if re.search(rf"{o}(?![\w-])", help_text)}
        assert taken == documented, name
        if "--T" in taken:  # argparse converts `--T` before it reaches `--help`
            assert _exit_code(module, ["--T", "1e4", "--help"], capsys)[0] == 0, name


def test_long_memory_smoke_measures_solvers_against_float32_and_float64(tmp_path):
    rows, _ = _run("long_memory", tmp_path, "--solvers", "DEER", "Picard")
    (seq,) = [r for r in rows if r["solver"] == "sequential"]
    assert 0 <= seq["max_abs_err64"] < 1e-5  # the float32 scan against float64
    solved = {r["solver"]: r for r in rows if r["solver"] != "sequential"}
    assert set(solved) == {"DEER", "Picard"}
    for r in solved.values():
        assert 1 <= r["num_steps"] <= r["max_steps"] <= r["T"]
        if r["converged"]:
            assert r["max_abs_err"] < 1e-4 and r["max_abs_err64"] < 1e-4
    assert solved["DEER"]["converged"]
    with open(tmp_path / "long_memory_count_gru_s0_T64.csv") as f:
        trace = list(csv.DictReader(f))
    assert len(trace) == max(r["num_steps"] for r in solved.values())
    assert set(trace[0]) == {"iteration", "DEER", "Picard"}


def test_train_charlm_smoke_matches_bptt_and_logs_iterations_per_layer(tmp_path):
    (summary,), _ = _run("train_charlm", tmp_path)
    # float32, default tolerance: the parallel layers' loss curve is BPTT's.
    assert summary["max_rel_diff"] < 1e-5
    assert summary["not_converged"] == 0 and summary["fell_back"] == 0
    with open(tmp_path / "train_charlm.csv") as f:
        table = [r for r in csv.DictReader(f) if r["method"] == "DEER"]
    assert len(table) == summary["steps"]
    for r in table:
        assert all(1 <= int(r[k]) <= summary["T"] for k in ("L0_train", "L1_train", "L1_zero"))


def test_bench_training_smoke_times_bptt_and_parallel_steps(tmp_path):
    rows, _ = _run("bench_training", tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"BPTT", "DEER", "DEER warm"}
    for r in rows:
        assert r["status"] == "ok" and r["converged"] and r["compiled_mib"] > 0
    # States one Adam step old are a better first iterate than zeros.
    assert 1 <= by_method["DEER warm"]["num_steps"] < by_method["DEER"]["num_steps"]
