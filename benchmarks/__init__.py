"""Benchmarks of the BLV loss: micro-benchmarks against its peers and the copy-bandwidth floor
(``python -m benchmarks.loss``), end-to-end training overhead (``python -m benchmarks.training``),
and the project's prepared GPU check (``bash benchmarks/gpu_check.sh OUTDIR``)."""
