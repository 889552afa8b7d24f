import json, statistics, collections, sys
rows=[json.loads(l) for l in open('results/runs.jsonl') if l.strip()]
by=collections.defaultdict(list)
for r in rows: by[r['label']].append(r)
keys=[('conn_per_s','conn/s'),('rss_kb_per_conn','RSS kB/conn'),('idle_cpu_ms','idle CPU ms/10s'),('threads_10k','threads'),
      ('push_p50_us','push p50 us'),('push_p99_us','push p99 us'),('push_p999_us','push p999 us'),('push_server_cpu_pct','push srv CPU%'),
      ('tp_50x16_rps','50x16 req/s'),('tp_50x16_us_cpu_per_req','50x16 srv us/req'),('tp_4x256_rps','4x256 req/s'),('tp_4x256_us_cpu_per_req','4x256 srv us/req')]
order=['mio','tokio-ct','tokio-mt','compio-uring','compio-poll']
print('| metric (median of n) | '+' | '.join(f'{l} (n={len(by[l])})' for l in order if l in by)+' |')
print('|---|'+'---|'*len([l for l in order if l in by]))
for k,name in keys:
    cells=[]
    for l in order:
        if l not in by: continue
        v=[r[k] for r in by[l] if k in r]
        if not v: cells.append('-'); continue
        m=statistics.median(v)
        fmt=(lambda x: f'{x:,.0f}') if abs(m)>=100 else (lambda x: f'{x:.2f}')
        cells.append(fmt(m)+(' ['+', '.join(fmt(x) for x in v)+']' if '--all' in sys.argv else ''))
    print(f'| {name} | '+' | '.join(cells)+' |')
bad=[(r['label'],r['round'],r.get('push_recv'),r.get('conns'),r.get('tp_50x16_misordered'),r.get('tp_4x256_misordered')) for r in rows if r.get('push_recv')!=r.get('push_sent') or r.get('conns')!=10000 or r.get('tp_50x16_misordered') or r.get('tp_4x256_misordered')]
print('anomalies:',bad)
