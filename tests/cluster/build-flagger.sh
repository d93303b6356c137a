#!/usr/bin/env bash
# Builds Flagger (the reference tool of benches/side_by_side.rs) from its Go module into the same
# per-user cache as the control plane, keyed by version:
#   $RC_CACHE_DIR/flagger-v1.36.1/flagger    the binary (`go install github.com/fluxcd/flagger/cmd/flagger@v1.36.1`)
#   $RC_CACHE_DIR/flagger-v1.36.1/crd.yaml   its CRDs (kustomize/base/flagger/crd.yaml of the same module)
# A second run only checks the `.complete` marker (instant). Nothing is written to the work tree.
# Prints the directory on stdout (progress goes to stderr).
#
# Flagger v1.36.1's go.mod says `go 1.21`, so the machine's Go (1.26) builds it: GOTOOLCHAIN=local.
# (Were a newer Go required, GOTOOLCHAIN=go1.27.3 would fetch that toolchain from the Go proxy.)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"

FLAGGER_VERSION=v1.36.1 # also in benches/side_by_side.rs
FLAGGER_MODULE=github.com/fluxcd/flagger
FLAGGER_DIR=$RC_CACHE_DIR/flagger-$FLAGGER_VERSION

command -v go >/dev/null || { echo "build-flagger.sh: Go is required (https://go.dev/dl); it is not on PATH" >&2; exit 1; }
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-local}
start=$(date +%s)
say() { printf '[build-flagger %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }

if [ -f "$FLAGGER_DIR/.complete" ]; then
  say "cached: $FLAGGER_DIR"
  echo "$FLAGGER_DIR"
  exit 0
fi

tmp="$FLAGGER_DIR.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"

say "flagger $FLAGGER_VERSION: downloading the module"
# Outside any module (from /tmp), so that no go.mod of ours is consulted or touched.
dir=$(cd /tmp && go mod download -json "$FLAGGER_MODULE@$FLAGGER_VERSION" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -f "$dir/kustomize/base/flagger/crd.yaml" ]; then
  echo "build-flagger.sh: could not download $FLAGGER_MODULE@$FLAGGER_VERSION" >&2
  exit 1
fi
cp "$dir/kustomize/base/flagger/crd.yaml" "$tmp/crd.yaml"
chmod 644 "$tmp/crd.yaml" # the module cache is read-only

say "flagger $FLAGGER_VERSION: go install (about 2 minutes on 2 cores, plus module downloads when cold)"
# `go install pkg@version` builds the module with its own go.mod and go.sum (no wrapper module needed).
(cd /tmp && GOBIN="$tmp" go install -trimpath \
  -ldflags "-s -w" "$FLAGGER_MODULE/cmd/flagger@$FLAGGER_VERSION")
[ -x "$tmp/flagger" ] || { echo "build-flagger.sh: go install produced no flagger binary" >&2; exit 1; }
"$tmp/flagger" -version >&2

touch "$tmp/.complete"
rm -rf "$FLAGGER_DIR"
mv "$tmp" "$FLAGGER_DIR"
trap - EXIT
say "built: $FLAGGER_DIR ($(( $(date +%s) - start )) s)"
echo "$FLAGGER_DIR"
