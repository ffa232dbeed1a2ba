//! BigQuery emulator helpers and the fault proxy (bigquery-sink tests).
