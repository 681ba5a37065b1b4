"""The README's usage example runs as written, on a model built from plain Flax layers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_example() -> str:
  text = README.read_text()
  section = text[text.index("## Using the pieces in your own JAX code") :]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_usage_example_runs_on_a_plain_flax_model():
  code = _usage_example()
  assert "nn.Dense" in code and "GhostDense" not in code
  namespace: dict = {}
  exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["norms"].shape == (128,)
  assert namespace["hg"].grads.shape == (1, 128)
  assert namespace["pool_probs"].shape == (len(namespace["ds"].train),)
  assert namespace["delta"].shape == (20,)
  assert namespace["result"].history[-1]["test/accuracy"] > 0.5
