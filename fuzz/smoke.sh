#!/usr/bin/env bash
# Short fuzz smoke: every cargo-fuzz target for ${FUZZ_SECS:-20} seconds.
# Installs cargo-fuzz if missing. Exits non-zero on any crash, panic or
# failed assertion (the input is saved under fuzz/artifacts/<target>/).
#
#   FUZZ_SECS=60 fuzz/smoke.sh            # longer
#   FUZZ_TARGETS="open_damaged" fuzz/smoke.sh
#   FUZZ_SANITIZER=none fuzz/smoke.sh     # ~2x faster, no ASan
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

secs="${FUZZ_SECS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
targets="${FUZZ_TARGETS:-record_decode segment_decode open_damaged crash_recovery im_records protocol_decode im_faults server_conn}"

# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== building fuzz targets (sanitizer: $sanitizer, debug assertions on)"
cargo fuzz build -a --sanitizer "$sanitizer"

for t in $targets; do
    echo "== $t: ${secs}s"
    mkdir -p "corpus/$t"
    # corpus/<t> (git-ignored, grows) first, then the checked-in seeds.
    cargo fuzz run -a --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -len_control=0 -max_len=4096 -print_final_stats=1
done
echo "== fuzz smoke passed: $targets"
