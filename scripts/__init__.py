"""Developer tooling: the demo and the Airflow sandbox the end-to-end tests share."""
