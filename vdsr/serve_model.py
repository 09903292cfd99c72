"""The served model's Python file (MLflow "models from code"): ``vdsr register`` logs this file as
the pyfunc's ``python_model``, and the server runs it to get the model, so no pickle is logged or
loaded. :class:`vdsr.serve.VdsrPyfunc` comes from the model's own ``code/vdsr/``."""

from mlflow.models import set_model

from vdsr.serve import VdsrPyfunc

set_model(VdsrPyfunc())
