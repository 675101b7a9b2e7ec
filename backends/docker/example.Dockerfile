# The example pipeline's image: airflow-remote-ml/example:latest, the runner plus dags/example_ml.
#
# The pipeline's step functions (example_ml.steps:prepare, :train, ...) are importable from
# /opt/remote-ml/code, so `callable="example_ml.steps:train"` runs the same code in this image as on the
# local backend. Built by build-images.sh from a context holding only this file and example_ml/.
FROM airflow-remote-ml/runner:latest

COPY example_ml/ /opt/remote-ml/code/example_ml/
ENV PYTHONPATH=/opt/remote-ml/code
