//! `reopen`: recovery time of an existing directory.

use super::append::rate;
use super::{base_line, keyspace, ks_name, open_engine, rng_for, timeline};
use crate::report::Reporter;
use crate::sysinfo::{count_files, peak_rss_bytes};
use crate::{Flags, Result};
use rand::Rng;
use std::time::Instant;
use timeline_engine::Direction;

/// Timelines whose newest page is read back after opening.
const SPOT_CHECKS: usize = 1000;

/// `timeline-bench reopen --dir PATH`: returns the number of errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let Some(dir) = &flags.dir else {
        return Err("reopen needs --dir PATH (a directory an earlier run kept)".into());
    };
    if !dir.join("engine.meta").is_file() {
        return Err(format!("{} holds no engine (no engine.meta)", dir.display()).into());
    }
    let files_before = count_files(dir);
    let (engine, open_secs) = open_engine(flags, dir)?;
    let st = engine.stats();
    let ks = keyspace(flags);
    eprintln!(
        "reopen: opened {} in {open_secs:.3} s ({} timelines); counting messages over ids 0..{}",
        dir.display(),
        st.total().timelines,
        flags.timelines
    );
    // The engine cannot list timelines: assume W1's id space 0..timelines.
    let t = Instant::now();
    let mut with_data = Vec::new();
    let mut messages = 0u64;
    for id in 0..flags.timelines {
        let last = engine.last_seq(timeline(ks, id));
        if last > 0 {
            with_data.push((id, last));
            messages += last;
        }
    }
    let count_secs = t.elapsed().as_secs_f64();
    if (with_data.len() as u64) < st.keyspace(ks).timelines {
        eprintln!(
            "reopen: warning: only {} of the {} {} timelines have ids in 0..{}; `messages` undercounts",
            with_data.len(),
            st.keyspace(ks).timelines,
            ks_name(ks),
            flags.timelines
        );
    }

    // Spot-check: the newest page of up to SPOT_CHECKS timelines.
    let mut errors = 0u64;
    let mut rng = rng_for(flags.seed, 3000);
    let checks = SPOT_CHECKS.min(with_data.len());
    for _ in 0..checks {
        let (id, last) = with_data[rng.gen_range(0..with_data.len())];
        let want = last.min(flags.read_len as u64);
        match engine.scan(
            timeline(ks, id),
            u64::MAX,
            flags.read_len,
            Direction::Backward,
        ) {
            Ok(page) => {
                let ok = page.len() as u64 == want
                    && page
                        .iter()
                        .enumerate()
                        .all(|(i, r)| r.seq == last - i as u64);
                if !ok {
                    errors += 1;
                    eprintln!("reopen: timeline {id}: newest page is not seqs {last} down (got {} records)", page.len());
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("reopen: timeline {id}: scan failed: {e}");
            }
        }
    }
    eprintln!(
        "reopen: counted in {count_secs:.3} s; spot-checked {checks} timelines, {errors} error(s)"
    );

    let mut line = base_line(flags, "reopen", &engine);
    line.ops = 1;
    line.secs = open_secs;
    line.ops_per_sec = rate(1, open_secs);
    line.open_secs = Some(open_secs);
    // Messages held: the sum of every timeline's last SeqId across both
    // keyspaces, from the engine's own index (not only ids 0..--timelines).
    let (_, store_msgs) = engine.census(timeline_engine::Keyspace::STORE);
    let (_, sync_msgs) = engine.census(timeline_engine::Keyspace::SYNC);
    if store_msgs + sync_msgs != messages {
        eprintln!(
            "reopen: ids 0..{} hold {messages} of {} messages",
            flags.timelines,
            store_msgs + sync_msgs
        );
    }
    line.messages = Some(store_msgs + sync_msgs);
    line.timelines = Some(st.total().timelines);
    line.timelines_with_data = Some(with_data.len() as u64);
    line.index_bytes = Some(st.total().index_bytes);
    line.errors = Some(errors);
    line.read_len = Some(flags.read_len);
    let (a, f) = crate::sysinfo::rss_split();
    line.rss_anon_bytes = Some(a);
    line.rss_file_bytes = Some(f);
    let t = Instant::now();
    engine.close()?;
    line.close_secs = Some(t.elapsed().as_secs_f64());
    line.peak_rss_bytes = Some(peak_rss_bytes());
    line.files = Some(count_files(dir));
    if line.files != Some(files_before) {
        eprintln!(
            "reopen: files before open {files_before}, after close {:?}",
            line.files
        );
    }
    rep.push(line)?;
    Ok(errors)
}
