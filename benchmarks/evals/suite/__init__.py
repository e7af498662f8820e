"""The built-in benchmark suite: one task per column of the paper's LLaVA-1.5 table, on generated scenes no
training set contains, plus Fashion-MNIST; data as `datasets` folders, scored by lmms-eval (benchmarks/evals/tasks).

    tasks.TASKS        the one table: name -> TaskSpec (report label, paper column, primary metric, chance, default n,
                       seed, prompt suffix, metrics, output type: options scored by likelihood, or generated)
    prompts            the prompt suffixes (no imports: the bridge's training data imports them)
    build.build_task   one task's data folder; build.ensure_data builds the missing ones
    metrics            the per-sample scorers and aggregates (VQA match, relaxed accuracy, MME, POPE, OCRBench), and
                       the options of a fixed-option question (choices)
    shapes / reading   the generators, over the scenes `encoder.data.synth.is_heldout` reserves
The suite imports encoder.data (scenes, vocabulary, held-out rule), never the bridge.
"""
