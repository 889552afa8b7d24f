#!/usr/bin/env bash
# One-machine cluster: etcd plus three timeline-server nodes on loopback
# (docs/scaling.md, "Running a cluster on one machine").
#
#   server/scripts/local-cluster.sh [DIR]      # DIR default: ./cluster-data
#
# etcd listens on 127.0.0.1:2379 (peer 2380); node N (1..3) serves clients
# on 127.0.0.1:742N and peers on 127.0.0.1:752N, data in DIR/nodeN. Ctrl-C
# stops everything. Talk to it with
#   timeline-cli --addr 127.0.0.1:7421,127.0.0.1:7422,127.0.0.1:7423 append 42 hi
# Environment: NODES (default 3), BIN (default target/release), ETCD
# (default: etcd on $PATH, Debian's etcd-server package), EXTRA (more
# timeline-server flags for every node, e.g. "--io-threads 1").
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${1:-./cluster-data}"
NODES="${NODES:-3}"
BIN="${BIN:-target/release}"
ETCD="${ETCD:-etcd}"
command -v "$ETCD" >/dev/null || { echo "etcd not found: apt-get install etcd-server" >&2; exit 2; }
[ -x "$BIN/timeline-server" ] || cargo build --release -p timeline-server -p timeline-client
mkdir -p "$DIR"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

"$ETCD" --name tl-etcd --data-dir "$DIR/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster tl-etcd=http://127.0.0.1:2380 --logger zap --log-level warn \
    >"$DIR/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null && break
    sleep 0.1
done
for n in $(seq 1 "$NODES"); do
    "$BIN/timeline-server" --cluster --etcd 127.0.0.1:2379 --node-id "$n" \
        --listen "127.0.0.1:742$n" --raft-listen "127.0.0.1:752$n" \
        --data-dir "$DIR/node$n" ${EXTRA:-} >"$DIR/node$n.log" 2>&1 &
    pids+=($!)
done
seeds=$(seq -s, -f "127.0.0.1:742%g" 1 "$NODES")
for _ in $(seq 1 100); do
    "$BIN/timeline-cli" --addr "$seeds" cluster-map >/dev/null 2>&1 && break
    sleep 0.2
done
"$BIN/timeline-cli" --addr "$seeds" cluster-map | head -3 || true
echo "cluster up: --addr $seeds (logs in $DIR; Ctrl-C stops it)"
wait
