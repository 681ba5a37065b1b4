"""Forecasting where a training run is going from its learning curve so far and the run-level summaries of its
per-sample signals: targets (`targets`), features (`features`), the corpus table (`table`), validation that
keeps a configuration's seeds together (`validation`), the models (`models`) and the `metasel forecast` tool
(`tool`)."""

from metasel import extras

try:
  import scipy  # noqa: F401
  import sklearn  # noqa: F401
except ModuleNotFoundError as error:
  raise extras.missing(error, needed_by="metasel.forecast") from None

from metasel.forecast import features, models, reading, table, targets, tool, validation  # noqa: E402
from metasel.forecast.features import curve_features, fit_pow3, pow3, prechelt, sample_features  # noqa: E402
from metasel.forecast.models import Forecaster, fit_forecaster  # noqa: E402
from metasel.forecast.reading import Run, check_run, read_runs  # noqa: E402
from metasel.forecast.table import Table, build_table  # noqa: E402
from metasel.forecast.targets import final_accuracy, gain, level, plateau_epoch  # noqa: E402
from metasel.forecast.tool import forecast_run, load_forecasters, retrain  # noqa: E402

__all__ = [
    "features", "models", "reading", "table", "targets", "tool", "validation",
    "curve_features", "fit_pow3", "pow3", "prechelt", "sample_features",
    "Forecaster", "fit_forecaster", "Run", "check_run", "read_runs", "Table", "build_table",
    "final_accuracy", "gain", "level", "plateau_epoch", "forecast_run", "load_forecasters", "retrain",
]
