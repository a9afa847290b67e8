"""Storage and rows, free of Ray: ``storage`` (local disk and S3), ``units`` (Parquet footers, input identity, units
of work), ``rows`` (validation, rejects, layouts, top-N), ``commit`` (the output folder's commit protocol),
``lease`` (one run per output folder), ``collections`` (test collections: TREC, BEIR, SMART, Cranfield)."""
