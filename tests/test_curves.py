"""Learning-curve summaries against hand-made curves."""

import numpy as np
import pytest

from metasel import curves


def test_final_value_averages_the_last_evaluations():
  assert curves.final_value([0.1, 0.5, 0.6, 0.7]) == pytest.approx(0.6)
  assert curves.final_value([0.4, 0.6], last=3) == pytest.approx(0.5)


def test_normalised_area_is_the_mean_level_of_the_curve():
  assert curves.normalised_area([10, 20, 30], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
  # Trapezoids: (0.2 + 0.6) / 2 * 10 + (0.6 + 1.0) / 2 * 10 = 12 over a span of 20.
  assert curves.normalised_area([10, 20, 30], [0.2, 0.6, 1.0]) == pytest.approx(0.6)
  assert curves.normalised_area([5], [0.7]) == pytest.approx(0.7)


def test_steps_to_interpolates_and_flags_censored_runs():
  steps, acc = [10, 20, 30, 40], [0.2, 0.5, 0.7, 0.8]
  assert curves.steps_to(steps, acc, 0.6) == (pytest.approx(25.0), True)
  assert curves.steps_to(steps, acc, 0.1) == (10.0, True)
  assert curves.steps_to(steps, acc, 0.9) == (40.0, False)
  assert curves.steps_to(steps, acc, 0.8) == (pytest.approx(40.0), True)


@pytest.mark.parametrize(
    "steps, values, message",
    [([1, 2], [0.5], "one value per evaluation"), ([2, 1], [0.1, 0.2], "increase"), ([1, 2], [0.1, np.nan], "NaN")],
)
def test_bad_curves_are_refused(steps, values, message):
  with pytest.raises(ValueError, match=message):
    curves.normalised_area(steps, values)
