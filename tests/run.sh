#!/bin/bash
#
# vublk's whole test suite, as CI runs it: installs what it needs, checks formatting and lints,
# builds, prepares the end-to-end guest, and runs every test (unit, integration against the
# real daemon, protocol, end-to-end with a QEMU guest).
#
# Usage: tests/run.sh            (from anywhere; needs root or sudo for apt-get)

set -euo pipefail

workspace=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$workspace"

step() { echo "==> $*" >&2; }

step "installing dependencies"
tests/install-deps.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "building"
cargo build --workspace --bins --locked

step "building the end-to-end guest (cached under target/e2e)"
tests/e2e/build-guest.sh

step "running the tests"
cargo nextest run --workspace --locked --profile ci "$@"
