"""One-shot job of the compose stack: creates the dataset the bigquery-sink writes to.

Environment: BIGQUERY_ENDPOINT (http://bigquery:9050), BQ_PROJECT, BQ_DATASET.
Idempotent: an existing dataset (HTTP 409) is fine. Retries while the emulator starts.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

endpoint = os.environ.get("BIGQUERY_ENDPOINT", "http://bigquery:9050").rstrip("/")
project = os.environ.get("BQ_PROJECT", "test-project")
dataset = os.environ.get("BQ_DATASET", "movielog")
body = json.dumps({"datasetReference": {"projectId": project, "datasetId": dataset}}).encode()
url = f"{endpoint}/bigquery/v2/projects/{project}/datasets"

deadline = time.monotonic() + 120
while True:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"created dataset {project}.{dataset} (HTTP {response.status})")
            sys.exit(0)
    except urllib.error.HTTPError as err:
        if err.code == 409:
            print(f"dataset {project}.{dataset} already exists")
            sys.exit(0)
        reason = f"HTTP {err.code}: {err.read()[:500]!r}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(err)
    if time.monotonic() > deadline:
        sys.exit(f"creating dataset {project}.{dataset} at {url} failed: {reason}")
    print(f"emulator not ready ({reason}); retrying", flush=True)
    time.sleep(2)
