#!/usr/bin/env bash
# Mutation testing of the guest-facing and data-path code with cargo-mutants.
#
#   scripts/mutants.sh [FILE...]      # default: every file listed in FILES below
#
# For each FILE, cargo-mutants mutates that file only and runs the fast tests that cover it (the
# mapping is below; the QEMU guest tests are never used). Results go to mutants.out/<file>/
# (outcomes.json, caught.txt, missed.txt, unviable.txt, timeout.txt); a summary line per file is
# printed at the end. Mutants that no test can kill are listed with the reason in .cargo/mutants.toml
# (exclude_re), which cargo-mutants reads by itself.
#
# Slow: every mutant is a rebuild plus a test run (on 2 cores, minutes per file for the small ones,
# an hour or more for request.rs/poller.rs). Not part of scripts/test.sh.
# Needs cargo-mutants: cargo install cargo-mutants --locked
#
# Environment: MUTANTS_JOBS=N (parallel builds, each in its own copy of the tree),
# MUTANTS_MIN_TIMEOUT=S (lower bound of the per-mutant test time-out, default 20 s),
# MUTANTS_IN_PLACE=1 (mutate this tree and reuse its target/mutants: no copy, no cold baseline build;
# only in a checkout you are not editing, since the file is mutated while a mutant runs),
# MUTANTS_ITERATE=1 (skip the mutants an earlier run into the same mutants.out/<file>/ caught or found
# unviable: resume a stopped run, or re-check only what was missed).
set -euo pipefail
cd "$(dirname "$0")/.."

FILES=(
    src/vhost/request.rs
    src/vhost/poller.rs
    src/vhost/device.rs
    src/bdev/channel.rs
    src/bdev/registry.rs
    src/ocssd/emu.rs
    # The file bdev's inline channel (RWF_NOWAIT on the poller thread, the default engine=auto path).
    src/bdev/file_inline.rs
    # The file bdev and its engines underneath (io_uring, threads).
    src/bdev/file.rs
)
# The FTL and cache modules as they land.
for f in src/ftl.rs src/ftl/*.rs src/bdev/ftl.rs src/bdev/ftl/*.rs src/cache.rs src/cache/*.rs src/bdev/cache.rs \
    src/bdev/cache/*.rs; do
    [[ -f "$f" ]] && FILES+=("$f")
done

command -v cargo-mutants >/dev/null || {
    echo "mutants.sh: cargo-mutants is missing: cargo install cargo-mutants --locked" >&2
    exit 3
}

# The fast tests that cover FILE: cargo test arguments, then "--" and a test-name filter if any
# (arguments for the test binaries themselves, such as --skip or several name filters, after a
# second "--": cargo test itself takes one name filter only).
tests_for() {
    case "$1" in
        src/vhost/request.rs) echo "--lib -- vhost::" ;;
        src/vhost/poller.rs | src/vhost/device.rs)
            echo "--lib --test vhost_frontend --test vhost_async --test vhost_blkio --test ops_gaps --test hostile_ring --test inflight_restart" ;;
        src/bdev/channel.rs) echo "--lib -- bdev:: -- --skip rbd::" ;;
        # The inline channel: its own tests and the bdev conformance suite; inflight_restart runs the
        # daemon with engine=auto on tmpfs (every request inline).
        src/bdev/file_inline.rs) echo "--lib --test inflight_restart -- -- bdev:: requests_in_flight --skip rbd::" ;;
        # The file bdev's engines: the conformance suite (both engines, direct, block device, zero-write
        # fallback) and the daemon tests that count syncs and check the engine in use.
        src/bdev/file.rs)
            echo "--lib --test ops_gaps -- -- bdev:: write_through sigterm_syncs io_uring_file_bdevs stop_finishes --skip rbd::" ;;
        # The control socket's look-ups (claimed_by, bdev_stats, control) are tested through vblkd ctl.
        src/bdev/registry.rs) echo "--lib --test ops_registry --test control -- -- --skip rbd::" ;;
        # (Skipped: the lib tests of unrelated modules; the rbd ones also need the test Ceph cluster.)
        src/ocssd/emu.rs) echo "--lib --test ocssd_emu --test ops_gaps -- -- --skip rbd:: --skip vhost:: --skip cache::" ;;
        # On-medium state (superblock, band metadata, restore, nv-cache ring): the crash tests too
        # (their test names are the filters after the module's own).
        src/ftl/md.rs | src/ftl/restore.rs | src/ftl/layout.rs | src/ftl/nvcache.rs)
            echo "--lib --test ftl_crash --test ftl_nvcache -- -- ftl:: kill_9 nv_cache_refusals" ;;
        src/ftl/*) echo "--lib -- ftl::" ;;
        src/cache/layout.rs | src/cache/mod.rs)
            echo "--lib --test cache_cli --test cache_crash -- -- cache:: kill_9 refusals defaults" ;;
        src/cache/*) echo "--lib -- cache::" ;;
        *) echo "--lib" ;;
    esac
}

[[ $# -gt 0 ]] && FILES=("$@")
summary=()
for f in "${FILES[@]}"; do
    [[ -f "$f" ]] || { echo "mutants.sh: no such file $f" >&2; exit 3; }
    spec=$(tests_for "$f")
    # Test targets go to every cargo invocation (the build of each mutant then compiles and links only
    # those, not every test binary of the crate); a test-name filter goes to the test run only.
    read -r -a targets <<<"${spec%% -- *}"
    filter=()
    [[ "$spec" == *" -- "* ]] && read -r -a filter <<<"${spec#* -- }"
    cargs=()
    for t in "${targets[@]}"; do cargs+=("--cargo-arg=$t"); done
    out="mutants.out/${f//\//_}"
    mkdir -p "$out"
    echo "mutants.sh: $f with: cargo test ${spec}" >&2
    rc=0
    # The time-out is set from the baseline's test time (timeout_multiplier in .cargo/mutants.toml),
    # at least MUTANTS_MIN_TIMEOUT seconds: a mutant that makes a test hang costs that much.
    cargo mutants --no-shuffle --minimum-test-timeout "${MUTANTS_MIN_TIMEOUT:-20}" ${MUTANTS_JOBS:+-j "$MUTANTS_JOBS"} ${MUTANTS_IN_PLACE:+--in-place} ${MUTANTS_ITERATE:+--iterate} \
        --output "$out" --file "$f" "${cargs[@]}" -- "${filter[@]}" || rc=$?
    # Exit codes: 0 all caught, 2 some missed, 3 some timed out, 1/4 usage or baseline failure.
    [[ $rc -eq 0 || $rc -eq 2 || $rc -eq 3 ]] || { echo "mutants.sh: cargo mutants failed ($rc) on $f" >&2; exit "$rc"; }
    d="$out/mutants.out"
    count() { if [[ -f "$d/$1.txt" ]]; then grep -c . "$d/$1.txt" || true; else echo 0; fi; }
    caught=$(count caught) missed=$(count missed) unviable=$(count unviable) timeout=$(count timeout)
    # With MUTANTS_ITERATE, what earlier runs caught or found unviable is listed apart.
    earlier=$(count previously_caught)
    tried=$((caught + missed + unviable + timeout + earlier))
    summary+=("$f: tried $tried, caught $caught, missed $missed, unviable $unviable, timeout $timeout, caught or unviable in earlier runs $earlier")
done
echo "mutants.sh: ---- summary ----"
printf 'mutants.sh: %s\n' "${summary[@]}"
