"""lm-evaluation-harness inside mixq eval: lm-eval's own task configs fed from local official files
(`data`, `taskdir`), mixq's local backend as the lm-eval model `mixq` (`model`), servers through lm-eval's
API models (`server`), HashHop in lm-eval's format (`hashhop`), the task functions lm-eval's modules cannot
run offline (`code` for HumanEval, `ifeval`), and one role's run through lm-eval's evaluator (`run`).

Importing this package imports nothing from lm-eval; `model` registers `mixq` with lm-eval when imported.
"""
