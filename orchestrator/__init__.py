"""Study -> job graph, job store, job runner, data loaders, MLflow tracking, reports."""
