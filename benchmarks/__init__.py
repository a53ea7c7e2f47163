"""Benchmarks and figures, run from the repository root as ``python -m benchmarks.<name>``
(``compare``, ``torch_peer``, ``gsag_table``, ``crf_bench``, ``crf_figure``; the GPU
measurement is ``bash benchmarks/gpu_bench.sh``). Importable by the tests as
``benchmarks.<name>`` without any ``sys.path`` edits."""
