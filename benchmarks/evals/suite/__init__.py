"""The built-in benchmark suite: one task per column of the paper's LLaVA-1.5 table, on generated scenes no
training set contains, plus Fashion-MNIST; data as `datasets` folders, scored by lmms-eval (benchmarks/evals/tasks).

    tasks.TASKS        name -> TaskSpec (paper column, primary metric, chance, default n, seed, prompt suffix)
    build.build_task   one task's data folder; build.ensure_data builds the missing ones
    metrics            the per-sample scorers and aggregates (VQA match, relaxed accuracy, MME, POPE, OCRBench)
    shapes / reading   the generators
"""
