#!/bin/sh
# Entry point of the Tandem images: one image, every service; the first argument picks it.
#
#   edge | router | cloud-ctx | attention-pool  [flags...]   -> python -m services.<name>.main
#   convert-models [model ids...]   convert the GGUF wheels into $TANDEM_CACHE once (all models
#                                   by default); the compose `model-init` service runs this
#   services.x.y | tandem.x | bench.x [args...]  -> python -m <module>
#   anything else                                -> exec'd as is (e.g. `bash`)
set -eu
PY="${PYTHON:-python}"
cmd="${1:-}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
    edge | edge-node) exec "$PY" -m services.edge_node.main "$@" ;;
    router) exec "$PY" -m services.router.main "$@" ;;
    cloud-ctx | cloud) exec "$PY" -m services.cloud_ctx.main "$@" ;;
    attention-pool | pool) exec "$PY" -m services.attention_pool.main "$@" ;;
    convert-models) exec "$PY" "$(dirname "$0")/convert_models.py" "$@" ;;
    services.* | tandem.* | bench.*) exec "$PY" -m "$cmd" "$@" ;;
    "" | -h | --help)
        echo "usage: <image> edge|router|cloud-ctx|attention-pool|convert-models [args...]" >&2
        [ -n "$cmd" ] && exit 0 || exit 2 ;;
    *) exec "$cmd" "$@" ;;
esac
