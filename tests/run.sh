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
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "building (vublk with the test-only sandbox probe command)"
cargo build --workspace --bins --locked --features vublk/sandbox-probe

step "building the end-to-end guest (cached under target/e2e)"
tests/e2e/build-guest.sh

step "running the tests (vublk confined, the default; the svirt label logic included)"
cargo nextest run --workspace --locked --profile ci --features vublk/sandbox-probe,vublk/svirt "$@"

step "running the integration and end-to-end tests again with --sandbox off"
# A feature that only works unconfined fails the run above; one that only works confined
# fails this one. The confinement tests (sandbox, seccomp allowlist, systemd units) are
# skipped here.
VUBLK_SANDBOX=off cargo nextest run --workspace --locked --profile ci --features vublk/sandbox-probe \
	-E 'package(vublk-tests) & !binary(sandbox) & !binary(seccomp_allowlist) & !binary(systemd_units)' "$@"
