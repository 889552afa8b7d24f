#!/bin/bash
# Usage: ./run.sh ROUNDS  -- alternates implementations each round; one fresh server process per run.
set -u
cd "$(dirname "$0")"
ulimit -n 20000
B=target/release
ROUNDS=${1:-3}
OUT=results/runs.jsonl
VARIANTS=("mio|srv-mio" "tokio-ct|srv-tokio" "tokio-mt|srv-tokio --mt" "compio-uring|srv-compio --driver uring" "compio-poll|srv-compio --driver poll")
for r in $(seq 1 "$ROUNDS"); do
  # rotate start position each round so no variant always runs first
  for i in $(seq 0 4); do
    idx=$(( (i + r - 1) % 5 ))
    label=${VARIANTS[$idx]%%|*}; cmd=${VARIANTS[$idx]#*|}
    port=$((7200 + r * 10 + idx))
    echo "=== round $r $label port $port load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a results/run.log
    $B/$cmd --addr 127.0.0.1:$port 2>>results/server-$label.log &
    P=$!
    sleep 0.5
    timeout 120 $B/client --addr 127.0.0.1:$port --pid $P --label "$label" \
      --conns 10000 --idle-secs 10 --push-rate 20000 --push-secs 10 --tp 50x16,4x256 --tp-secs 10 \
      > >(sed "s/^{/{\"round\":$r,\"load1\":$(cut -d' ' -f1 /proc/loadavg),/" >> $OUT) 2>>results/run.log
    kill $P; wait $P 2>/dev/null
    sleep 1
  done
done
echo DONE | tee -a results/run.log
