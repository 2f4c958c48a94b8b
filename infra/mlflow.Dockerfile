# The MLflow tracking server image used by infra/k8s/20-mlflow.yaml: MLflow (same version as the
# project's client), the PostgreSQL driver for the backend store and boto3 for the S3 artifact
# store. Build with the infra/ folder as context (nothing is copied in):
#
#   docker build -f infra/mlflow.Dockerfile -t 111122223333.dkr.ecr.us-west-2.amazonaws.com/bimors-mlflow:3.17.2 infra
FROM python:3.11-slim

RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.34" \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
