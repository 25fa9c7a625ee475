"""How memops decides which Hugging Face causal LMs it trains exactly: the structural rule (``rule``), tiny
float64 instances and their equivalence test (``tiny``), the generated record of what passed (``tested``) and
the per-type verdicts (``models``).  ``memops.integrations.transformers`` is the public seam over them."""
