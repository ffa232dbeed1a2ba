"""Helper of scripts/check-deploy.sh, run with the venv's Python (see there).

  k8s --schema KEDA.json --kube-version V... FILE...
      Every document of every FILE must validate: Kubernetes kinds against
      kubernetes-validate's strict schemas of each version V, keda.sh ScaledObjects
      against KEDA.json. Any other kind is an error (nothing is skipped).
  yaml-json FILE...      prints {"FILE": [document, ...]} (anchors and << merged)
  logstash-json FILE     prints the Logstash pipeline's syntax tree

Exit status: 0 valid, 1 invalid, 2 usage or unreadable input.
"""

import argparse
import json
import sys

import yaml


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def describe(doc):
    name = (doc.get("metadata") or {}).get("name", "?")
    return f"{doc.get('apiVersion')}/{doc.get('kind')} {name}"


def error_path(err):
    return "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)


def check_k8s(args):
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    with open(args.schema, encoding="utf-8") as f:
        keda = jsonschema.Draft202012Validator(json.load(f))
    failures = 0
    for path in args.files:
        docs = load_documents(path)
        if not docs:
            print(f"ERROR {path}: no YAML document")
            failures += 1
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                print(f"ERROR {path}: a document without apiVersion and kind")
                failures += 1
                continue
            what = f"{path}: {describe(doc)}"
            if doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject":
                errors = sorted(keda.iter_errors(doc), key=lambda e: list(e.absolute_path))
                for err in errors:
                    print(f"ERROR {what} against {args.schema}: {error_path(err)}: {err.message}")
                failures += len(errors)
                if not errors:
                    print(f"OK {what} against the KEDA ScaledObject schema")
                continue
            for version in args.kube_version:
                try:
                    used = kubernetes_validate.validate(doc, version, strict=True)
                    print(f"OK {what} against Kubernetes {used} (strict)")
                except ValidationError as err:
                    print(f"ERROR {what} against Kubernetes {err.version} (strict): "
                          f"{error_path(err)}: {err.message}")
                    failures += 1
                except SchemaNotFoundError as err:
                    print(f"ERROR {what}: {err.message}")
                    failures += 1
    return 1 if failures else 0


def yaml_json(args):
    out = {path: load_documents(path) for path in args.files}
    json.dump(out, sys.stdout, default=str)
    print()
    return 0


def logstash_json(args):
    from logstash_pipeline_parser import Pipeline

    tree = Pipeline.from_file(args.file).parse()
    json.dump(tree, sys.stdout, default=str)
    print()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    k8s = sub.add_parser("k8s")
    k8s.add_argument("--schema", required=True)
    k8s.add_argument("--kube-version", action="append", required=True)
    k8s.add_argument("files", nargs="+")
    yj = sub.add_parser("yaml-json")
    yj.add_argument("files", nargs="+")
    lj = sub.add_parser("logstash-json")
    lj.add_argument("file")
    args = parser.parse_args()
    try:
        return {"k8s": check_k8s, "yaml-json": yaml_json, "logstash-json": logstash_json}[
            args.cmd
        ](args)
    except (OSError, yaml.YAMLError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the parsers' own exceptions (e.g. pyparsing's)
        print(f"ERROR: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
