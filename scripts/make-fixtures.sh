#!/usr/bin/env bash
# Writes a NEW golden fixture set, tests/fixtures/v<N+1>, with this build of vmm: a tiny-guest
# snapshot, a repository with two snapshots and an export of one, an archive with a VM, its
# working set and an image (see tests/fixtures/README.md). Existing sets are never touched:
# every later build must keep reading them (cargo test --test fixtures_compat).
#
#   scripts/make-fixtures.sh            # needs /dev/kvm and binutils (as, ld)
#
# Run it whenever a format version changes (src/formats.rs), and commit the new set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

root=tests/fixtures
last=0
for d in "$root"/v*; do
	[[ -d $d ]] || continue
	n=${d##*/v}
	[[ $n =~ ^[0-9]+$ ]] && ((n > last)) && last=$n
done
out="$root/v$((last + 1))"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- src 2>/dev/null; then
	commit="$commit+uncommitted"
fi
echo "writing $out (vmm at $commit)" >&2
VMM_FIXTURES_OUT="$PWD/$out" VMM_FIXTURES_COMMIT="$commit" \
	cargo test --test fixtures_compat make_fixtures -- --ignored --exact --nocapture >&2
du -sh "$out" >&2
echo "$out"
