"""Object storage for the Airflow worker: URIs and paths, errors, and the masking of signed URLs."""
