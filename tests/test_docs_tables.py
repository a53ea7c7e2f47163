"""Every table of figures in the docs is what its source renders (benchmarks/docs_tables.py)."""
import json
import os
import re
import shutil

import pytest

from benchmarks import docs_tables

REPO = docs_tables.REPO


@pytest.mark.parametrize("table", docs_tables.TABLES, ids=lambda t: t.name)
def test_committed_table_is_what_its_source_renders(table):
    with open(os.path.join(REPO, table.page), encoding="utf-8") as f:
        text = f.read()
    rendered = docs_tables.replace_block(text, table.name, table.render(), table.page)
    assert rendered == text, (f"{table.page}: table {table.name} differs from its source; "
                              f"run python -m benchmarks.docs_tables")


def test_every_marker_has_a_table_and_every_result_a_page():
    assert docs_tables.unregistered_markers() == []
    names = [t.name for t in docs_tables.TABLES]
    assert len(names) == len(set(names))
    results = {f[:-5] for f in os.listdir(docs_tables.RESULTS_DIR) if f.endswith(".json")}
    assert results <= set(names), f"results no page shows: {sorted(results - set(names))}"
    for name in results:
        result = docs_tables.load_result(name)
        assert result["command"] and result["commit"] and result["versions"], name


def outside_markers(text: str) -> str:
    return re.sub(r"<!-- table ([\w-]+):.*?<!-- end table \1 -->", "", text, flags=re.S)


def test_no_table_of_figures_outside_the_generated_blocks():
    """A Markdown table row outside a generated block holds no measured figure (a
    decimal number outside a scale set ``{...}`` or code)."""
    for page in docs_tables.doc_pages():
        with open(os.path.join(REPO, page), encoding="utf-8") as f:
            text = outside_markers(f.read())
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for line in text.splitlines():
            if line.lstrip().startswith("|"):
                bare = re.sub(r"\{[^}]*\}|`[^`]*`", "", line)
                assert not re.search(r"\d\.\d|\d ?%|±", bare), f"{page}: {line[:100]}"


def test_the_generator_rewrites_only_between_the_markers(tmp_path, capsys):
    """A changed cell and text around it: --check names the page, a rewrite restores the
    cell and keeps the text."""
    root = tmp_path / "repo"
    for page in {t.page for t in docs_tables.TABLES}:
        (root / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, page), root / page)
    page = root / "docs" / "results.md"
    original = page.read_text(encoding="utf-8")
    figure = docs_tables.cell("demo_merges", "`demo_max`", "val mIoU")  # e.g. '73.5 ± 1.0'
    assert original.count(figure) == 1
    tampered = original.replace(figure, "48.00 ± 0.0").replace("# Results", "# Results, edited")
    assert tampered.count("48.00") == 1
    page.write_text(tampered, encoding="utf-8")
    pages = docs_tables.rendered_pages(root=str(root))
    now, new = pages["docs/results.md"]
    assert now == tampered and new == original.replace("# Results", "# Results, edited")
    assert all(now == new for p, (now, new) in pages.items() if p != "docs/results.md")


def test_preflight_table_rows_and_the_effort_they_were_compiled_at():
    """A hand-made farm file: one line per (config, topology, dtype), GiB per chip and the
    estimate as the JSON says, and the XLA effort of the rows under the table."""
    from benchmarks import preflight_table  # pylint: disable=import-outside-toplevel
    gib = 2**30
    common = {"config": "voc_x", "topology": "v5e:2x2", "dtype": "bfloat16", "chips": 4,
              "hosts": 1, "parallel_mode": "pmap", "param_sharding": "replicated",
              "lower_s": 1.0, "lower_cpu_s": 1.0, "fits": True, "jax": "J", "libtpu": "L",
              "exec_time_effort": -1.0}
    rows = [{**common, "step": "train", "global_batch": 16, "peak_bytes_per_chip": 3 * gib,
             "compile_s": 99.0, "compile_cpu_s": 49.0, "est_step_s": 0.25,
             "est_img_per_s": 64.0, "est_mfu": 0.125, "est_chip_hours": 1.5,
             "train_steps": 100},
            {**common, "step": "eval", "global_batch": 8, "peak_bytes_per_chip": gib // 2,
             "compile_s": 10.0, "compile_cpu_s": 8.0}]
    text = preflight_table.render([{"file": "voc_x.json", "commit": "abc", "rows": rows}])
    assert ("| voc_x | v5e:2x2 (4, 1) | bfloat16 | pmap / replicated | 16 | yes (3.0) "
            "| yes (0.5) | – | 250 | 64 | 12% | 1.5 (100 steps) | 111 (59 CPU; effort -1) |") in text
    assert "exec_time_optimization_effort (`parallel.exec_time_effort`) -1." in text
    assert "commit abc, jax J, libtpu L" in text


def test_preflight_glance_one_line_per_config_one_column_per_topology():
    """Hand-made train rows of two configs on two topologies: img/s and chip-hours in
    the cells, '**no**' with the GiB where it does not fit, '–' where not compiled, '†'
    where the batch was rounded up, v5e columns first by chips; float32 rows apart."""
    from benchmarks import preflight_table  # pylint: disable=import-outside-toplevel

    def train(config, topology, chips, **fields):
        row = {"step": "train", "config": config, "topology": topology, "chips": chips,
               "dtype": "bfloat16", "fits": True, "peak_bytes_per_chip": 2**30,
               "est_img_per_s": 343.6, "est_chip_hours": 0.84, **fields}
        return {"file": f"{config}_{topology}.json", "rows": [row]}

    results = [train("voc_a", "v6e:2x2", 4, est_img_per_s=1000.0, batch_note="rounded"),
               train("voc_a", "v5e:4x4", 16, fits=False, peak_bytes_per_chip=20 * 2**30),
               train("voc_b", "v5e:2x2", 4),
               train("voc_b", "v5e:2x2", 4, dtype="float32", est_img_per_s=1.0)]
    lines = preflight_table.glance(results, "bfloat16").splitlines()
    assert lines[0] == "| config | v5e:2x2 (4) | v5e:4x4 (16) | v6e:2x2 (4) |"
    assert lines[2] == "| voc_a | – | **no** (20.0 GiB) | 1000 · 0.8 h† |"
    assert lines[3] == "| voc_b | 344 · 0.8 h | – | – |"
    assert len(lines) == 4
    assert preflight_table.glance(results, "float32").splitlines()[2] == "| voc_b | 1 · 0.8 h |"
    results[2]["rows"][0]["farm_version"] = preflight_table.FARM_VERSION - 1  # an older program
    lines = preflight_table.glance(results, "bfloat16").splitlines()
    assert lines[3] == "| voc_b | 344 · 0.8 h‡ | – | – |" and lines[-1] == preflight_table.STALE_NOTE


def test_preflight_gap_rows_per_chip_and_the_negative_optimal_seconds():
    """Hand-made rows: the figures per chip and per image worked out by hand, a row of an
    older program left out, and the count of negative `optimal_seconds` over the
    current train and eval rows."""
    from benchmarks import preflight_table  # pylint: disable=import-outside-toplevel

    def result(topology, chips, raw, version=preflight_table.FARM_VERSION):
        common = {"config": "voc_a", "topology": topology, "chips": chips, "dtype": "bfloat16",
                  "farm_version": version}
        train = {**common, "step": "train", "global_batch": 16,
                 "bytes_accessed_per_chip": 12e9, "flops_per_chip": 2.5e12,
                 "est_basis": "memory: XLA bytes accessed / HBM bandwidth",
                 "est_img_per_s": 400.0, "est_mfu": 0.25, "xla_optimal_s_raw": raw}
        return {"file": f"{topology}.json",
                "rows": [train, {**common, "step": "eval", "xla_optimal_s_raw": 0.5}]}

    results = [result("v5e:2x2", 4, -3.0), result("v5e:4x4", 16, 0.01),
               result("v6e:2x2", 4, -1.0, version=preflight_table.FARM_VERSION - 1)]
    lines = preflight_table.gap(results, (("voc_a", "bfloat16",
                                           ("v5e:2x2", "v5e:4x4", "v6e:2x2")),)).splitlines()
    assert lines[2] == "| voc_a | v5e:2x2 | bfloat16 | 4 | 12.0 | 3.00 | 2.5 | memory | 100 | 25% | -3 |"
    assert lines[3] == "| voc_a | v5e:4x4 | bfloat16 | 1 | 12.0 | 12.00 | 2.5 | memory | 25 | 25% | 0.01 |"
    assert lines[4] == ""  # the v6e row is of an older program
    assert lines[5].startswith("XLA's `optimal_seconds` over every row of the current program: "
                               "negative for 1 of 2 train steps and 0 of 2 eval steps")


def test_compile_effort_table_from_appended_compiles(tmp_path):
    """Two hand-made ``compile_time --append`` lines: one table row each, in file order,
    MiB / GFLOP / GB as the columns say, the roofline of the pre-flight (the slower of
    FLOPs at 197 TFLOP/s and bytes at 819 GB/s on v5e), one command for both efforts."""
    from benchmarks import compile_time  # pylint: disable=import-outside-toplevel
    base = {"config": "voc_x", "step": "train", "topology": "v5e:2x2", "global_batch": 8,
            "compile_s": 20.0, "peak_bytes_per_chip": 3 * 2**20, "flops_per_chip": 197e9,
            "jax": "J", "jaxlib": "J", "libtpu": "L", "commit": "abc",
            "command": "python -m benchmarks.compile_time --config=c parallel.exec_time_effort=0"}
    lines = [{**base, "exec_time_effort": 0.0, "compile_cpu_s": 100.0,
              "bytes_accessed_per_chip": 0.4095e9},
             {**base, "exec_time_effort": -1.0, "compile_cpu_s": 10.0,
              "bytes_accessed_per_chip": 1.638e9,
              "command": base["command"].replace("=0", "=-1")}]
    jsonl, out = tmp_path / "e.jsonl", tmp_path / "e.json"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    compile_time.main([f"--table_from={jsonl}", f"--result={out}"])
    result = json.loads(out.read_text())
    assert result["rows"] == [
        ["voc_x", "train", "v5e:2x2", 8, 0.0, 100.0, 20.0, 3.0, 197.0, 0.41, 1.0],   # FLOPs
        ["voc_x", "train", "v5e:2x2", 8, -1.0, 10.0, 20.0, 3.0, 197.0, 1.64, 2.0]]  # bytes
    assert result["command"][0].endswith("parallel.exec_time_effort=E")
    assert len(result["command"]) == 2 and result["commit"] == "abc"
    assert len(result["columns"]) == len(result["rows"][0])


def test_gpu_tables_from_raw_folders(tmp_path, monkeypatch):
    """A hand-made ``gpu_<date>_<device>/`` folder with a lowerings run: one row per
    lowering, each rate divided by that run's ``native`` row; a folder with no
    ``compare.json`` gives no comparison table; the provenance is its ``meta.json``."""
    run = tmp_path / "gpu_2000-01-01_chip" / "bfloat16_lowerings"
    run.mkdir(parents=True)
    (run.parent / "meta.json").write_text(json.dumps(
        {"command": "bash benchmarks/gpu_bench.sh bfloat16 OUT", "commit": "abc",
         "machine": "one chip"}))
    (run / "versions.txt").write_text("jax   0.9.9\ntorch 3.0\n")
    def row(impl, train, evaluate, dilated):
        return {"dtype": "bfloat16", "dilated_conv": impl, "train_images_per_s": train,
                "eval_images_per_s": evaluate, "train_mfu": 0.1, "eval_mfu": 0.25,
                "compile_train_s": 30.0, "compile_eval_s": 5.0,
                "train_step_memory_bytes": 3 * 2**30,
                "train_convolutions": {"count": 10, "rhs_dilated": dilated}}
    (run / "lowerings.json").write_text(json.dumps(
        {"setup": {"device": "Chip"}, "complete": True,
         "results": [row("taps", 150.0, 40.0, 0), row("native", 100.0, 50.0, 6)]}))
    monkeypatch.setattr(docs_tables, "RESULTS_DIR", str(tmp_path))
    assert docs_tables.gpu_results() == []
    [(folder, result)] = docs_tables.gpu_lowering_results()
    assert folder == "gpu_2000-01-01_chip"
    assert result["rows"] == [
        ["Chip", "bfloat16", "taps", "150.0", "1.50×", "40.0", "0.80×", "10.0% / 25.0%",
         "30.0 / 5.0", "3.0", "0 of 10"],
        ["Chip", "bfloat16", "native", "100.0", "1.00×", "50.0", "1.00×", "10.0% / 25.0%",
         "30.0 / 5.0", "3.0", "6 of 10"]]
    assert result["versions"] == {"jax": "0.9.9", "torch": "3.0"}
    assert docs_tables.cell("dilated_conv_gpu", "Chip | bfloat16 | taps", "train vs native") \
        == "1.50×"
    rendered = docs_tables.TABLES[[t.name for t in docs_tables.TABLES].index(
        "dilated_conv_gpu")].render()
    assert "gpu_bench.sh bfloat16 OUT" in rendered and "at commit `abc`" in rendered
