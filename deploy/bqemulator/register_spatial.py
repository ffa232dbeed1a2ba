"""Registers the DuckDB spatial extension shipped in the duckdb-extension-spatial
wheel, so that the emulator does not try to download it when it starts."""

import glob
import os

import duckdb
import duckdb_extension_spatial as pkg

found = glob.glob(
    os.path.join(os.path.dirname(pkg.__file__), "extensions", "*", "spatial.duckdb_extension")
)
if not found:
    raise SystemExit("spatial.duckdb_extension not found in the duckdb-extension-spatial wheel")
duckdb.connect().execute(f"INSTALL '{found[0]}'")
print(f"registered {found[0]}")
