#!/bin/bash
B=/work/main/target/release/timeline-bench
cd /tmp/bench
$B append --keyspace sync --batch 200 --payload 150 --messages 4000000 --timelines 100000 --json > w1ceiling.jsonl 2>w1ceiling.err
$B fanout --json > w3_copy.jsonl 2> w3_copy.err
$B fanout --groups 60000 --json > w3_copy60k.jsonl 2> w3_copy60k.err
$B fanout --groups 60000 --entries reference --json > w3_ref60k.jsonl 2> w3_ref60k.err
$B fanout --groups 60000 --fanout-mode read --json > w3_read60k.jsonl 2> w3_read60k.err
$B fanout --groups 60000 --durability group --json > w3_group60k.jsonl 2> w3_group60k.err
$B im --json > w4.jsonl 2> w4.err
$B im --entries reference --json > w4_ref.jsonl 2> w4_ref.err
$B im --rate 20000 --messages 400000 --json > w4_rate20k.jsonl 2> w4_rate20k.err
$B im --rate 50000 --messages 600000 --json > w4_rate50k.jsonl 2> w4_rate50k.err
$B fanout-sweep --json > w5.jsonl 2> w5.err
echo done > done.txt
