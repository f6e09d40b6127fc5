"""stableblocks' benchmarks (run from the repository root, e.g. `python -m benchmarks.cost_model`).

ops           each op's cases, inputs, providers, unavoidable bytes and FLOPs
microbench    timings on CUDA (do_bench) or CPU (reference paths), to results/microbench.csv
bytes_moved   bytes counted in Triton's interpreter and at the aten dispatcher; FA2's traffic model
activation_memory, compile_report, throughput (with the nanoGPT baseline in nanogpt)
cost_model    the CPU cost model in one command; report renders results/README.md and the README block
gpu_check     on a CUDA GPU: the kernel tests on compiled kernels, model equivalence, timings, peak memory
"""
