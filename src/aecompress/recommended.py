"""The recommended setting for each kind of model: what `aecompress compress` does when
--method, --ratio or --targets are not given, and what `aecompress methods` marks.

The one place this advice lives; the reasons, with the results files they come from:
- causal LM: gptq, 4 bits with one scale per 64 weights (ratio 3.76 in bf16 bits), on the
  MLP matrices. Of every method measured on SmolLM2-135M it gives the smallest loss of
  WikiText-2 perplexity for its size, several times smaller where pruning and low-rank
  methods reach a few tens of percent (`benchmarks/results/quantization/`, chosen on
  validation in `pipeline.md`; `benchmarks/results/decoder_baselines.md` for the others),
  and the loaded model keeps the weights packed.
- encoder: the paper's autoencoder on the token embeddings (half of all-MiniLM-L6-v2's
  parameters) at ratio 10, the paper's setting: the best method there on STS-B test and on
  the GLUE probes' mean (`benchmarks/results/paper-grid-quick/report.md`,
  `benchmarks/results/glue-probe/report.md`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recommendation:
    kind: str  # "causal-lm" or "encoder" (models.model_kind)
    label: str  # for messages: "a causal LM"
    method: str
    ratio: float
    targets: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)  # fixed with this ratio only

    def flags(self) -> str:
        """The command-line flags that give this setting."""
        options = "".join(f" --option {key}={value}" for key, value in self.options.items())
        targets = ",".join(self.targets)
        return f"--method {self.method}{options} --ratio {self.ratio:g} --targets {targets}"


RECOMMENDED: dict[str, Recommendation] = {
    r.kind: r
    for r in [
        Recommendation(
            "causal-lm",
            "a causal LM",
            "gptq",
            3.76,
            ("up", "gate", "down"),
            {"bits": 4, "group": 64},
        ),
        Recommendation("encoder", "an encoder", "ae", 10.0, ("embed",)),
    ]
}
