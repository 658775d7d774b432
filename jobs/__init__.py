"""Dataset scale: Parquet prompt tables, Ray workers, submit / resume / status / regress, and the CLI."""
