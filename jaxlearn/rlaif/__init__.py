"""RLAIF: an AI judge labels preference pairs for DPO (docs/rlaif.md).

- `jaxlearn.rlaif.judge`: `Judge` (a model + a rubric, A/B next-token log-probs), `judge_pairs`
  (both orders, debiased), `agreement` (accuracy and position bias against checkable labels).
- `jaxlearn.rlaif.labels`: candidates (sampled or from a file) -> judged preference JSONL.
- `jaxlearn.rlaif.commands`: `jaxlearn rlaif agree` / `jaxlearn rlaif label`.
"""
