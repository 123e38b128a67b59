#!/usr/bin/env bash
# What `make test` needs beyond `make setup`: Node.js (18 or newer) and npm, and the
# packages of the grpc-js client that tests/services/test_node_client.py runs
# (tests/interop/node: @grpc/grpc-js, @grpc/proto-loader, protobufjs), exactly as its
# package-lock.json says, from the npm registry; again when package.json or the lock
# changes. Their install scripts do not run (protobufjs' only prints a version warning).
# Idempotent; `make run` does not need any of it.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_DIR=tests/interop/node
NODE_MAJOR_MIN=18
log() { printf '\033[1m[setup-tests]\033[0m %s\n' "$*"; }

# 1. Node.js and npm. Debian's nodejs (18 on Debian 12) and npm where node is missing;
#    an existing install is kept (NodeSource's nodejs carries its npm, and Debian's npm
#    conflicts with it).
if ! command -v node >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    log "apt-get install nodejs npm (for the grpc-js interop tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    log "Node.js is missing (run as root, or: sudo apt-get install nodejs npm)"; exit 1
  fi
fi
if ! command -v npm >/dev/null; then
  log "node is installed but npm is not: install the npm of that Node.js ($(command -v node))"
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt "$NODE_MAJOR_MIN" ]; then
  log "Node.js $(node --version) is too old for the interop client: it needs $NODE_MAJOR_MIN or newer"
  exit 1
fi

# 2. The client's packages; the stamp lives in node_modules, which npm ci replaces whole.
want=$(cat $NODE_DIR/package.json $NODE_DIR/package-lock.json | sha256sum | cut -c1-16)
if [ "$(cat $NODE_DIR/node_modules/.percept-setup 2>/dev/null)" != "$want" ]; then
  log "installing the grpc-js interop client's packages (npm ci in $NODE_DIR)"
  (cd $NODE_DIR && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
  echo "$want" > $NODE_DIR/node_modules/.percept-setup
fi
