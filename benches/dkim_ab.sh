#!/usr/bin/env bash
# DKIM signing's cost to the durable relay, same run: smtp-source (From: sender@example.com,
# 1 KiB payload) -> ringrelay (spool on the real disk) -> smtp-sink, through the shared
# harness (../shared/bench/any_relay.sh), with no DKIM, with an RSA-2048 key and with an
# Ed25519 key for example.com, interleaved rep by rep (one any_relay run per variant and rep).
#
# usage: benches/dkim_ab.sh [REPS] [MSGS] [SESSIONS]
#   env RINGRELAY (default target/release/ringrelay; give an absolute path),
#   RELAY_PORT / SINK_PORT (2737 / 2735). Needs postfix's smtp-source and smtp-sink, root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
REPS=${1:-3}
MSGS=${2:-20000}
SESS=${3:-50}
RINGRELAY=${RINGRELAY:-$ROOT/target/release/ringrelay}
export RELAY_PORT=${RELAY_PORT:-2737} SINK_PORT=${SINK_PORT:-2735}
WORK=$(mktemp -d /tmp/dkim_ab.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
KEYS="$ROOT/tests/data/dkim"
printf 'hostname = "relay.test"\n' >"$WORK/none.toml"
for v in rsa2048 ed25519; do
    printf 'hostname = "relay.test"\n[dkim."example.com"]\nselector = "s1"\nkey_file = "%s"\n' \
        "$KEYS/$v.pem" >"$WORK/$v.toml"
done
for rep in $(seq 1 "$REPS"); do
    for v in none rsa2048 ed25519; do
        echo "## rep $rep: $v"
        RELAY_NAME="ringrelay-dkim-$v" \
        RELAY_CMD="$RINGRELAY serve --config $WORK/$v.toml --listen 127.0.0.1:$RELAY_PORT --smarthost 127.0.0.1:$SINK_PORT --spool \$QDIR" \
            "$SHARED/any_relay.sh" 1 "$MSGS" "$SESS" 2>&1 | grep -E '^[0-9]' | head -1 |
            awk -v v="$v" '{print v, $0}' | tee -a "$WORK/rows"
    done
done
echo
echo "# variant  sess rep accept/s e2e/s drain_s cpu_s busy% peakRSS peakPSS procs (one run each)"
echo "# medians over $REPS reps: variant accept/s e2e/s cpu_s cpu_us/msg"
# median COLUMN VARIANT: the median of that column over the variant's runs
median() { awk -v v="$2" -v c="$1" '$1 == v {print $c}' "$WORK/rows" | sort -n |
    awk '{x[NR] = $1} END {print x[int((NR + 1) / 2)]}'; }
for v in none rsa2048 ed25519; do
    printf "%-8s %8s %8s %6s %8.0f\n" "$v" "$(median 4 "$v")" "$(median 5 "$v")" \
        "$(median 7 "$v")" "$(awk -v c="$(median 7 "$v")" -v m="$MSGS" 'BEGIN {print 1e6 * c / m}')"
done
